package tollgate_test

import (
	"context"
	"errors"
	"log"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

func Example() {
	client, err := tollgate.NewClient("127.0.0.1:50051",
		tollgate.WithDeadline(50*time.Millisecond),    // the deadline of every call
		tollgate.WithFailureMode(tollgate.FailClosed), // or FailOpen, the default
	)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	d, err := client.Decide(context.Background(), tollgate.Request{
		Scope:     "github-mcp",
		Identity:  "alice",
		Operation: "tools/call:search",
	})
	var unavailable *tollgate.UnavailableError
	switch {
	case errors.As(err, &unavailable):
		log.Printf("Tollgate is down and we fail closed: answer 503")
	case err != nil:
		log.Printf("refused as invalid or misconfigured: %v", err)
	case !d.Allowed:
		log.Printf("denied by %v; retry in %s", d.ViolatedPolicies(), d.RetryAfter)
	default:
		log.Printf("allowed; %d of %d left", d.Remaining, d.Limit)
	}
}

// An LLM gateway reserves the most a call can cost, calls the model, and
// settles with the real count.
func ExampleClient_Settle() {
	client, err := tollgate.NewClient("127.0.0.1:50051")
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	ctx := context.Background()

	const maxTokens = 4096
	d, err := client.Decide(ctx, tollgate.Request{
		Scope:        "llm",
		Identity:     "team-a",
		Cost:         maxTokens,                 // reserve the most it can use
		SettleWithin: 5 * time.Minute,           // settle within 5 minutes
		Priority:     tollgate.PriorityCritical, // a user is waiting
	})
	if err != nil || !d.Allowed {
		log.Printf("not now: %v, retry in %s", err, d.RetryAfter)
		return
	}
	used := complete(ctx, "hello", maxTokens) // the model's real token count
	if d.Reservation == "" {
		return // a degraded (fail-open) decision took nothing
	}
	for try := 0; try < 3; try++ {
		_, err := client.Settle(ctx, d.Reservation, used)
		var unavailable *tollgate.UnavailableError
		switch {
		case errors.As(err, &unavailable):
			time.Sleep(200 * time.Millisecond) // safe to retry: it settles once
			continue
		case errors.Is(err, tollgate.ErrAlreadySettled):
			// after an unavailable try: that one landed
		case err != nil:
			log.Printf("settle refused: %v", err)
		}
		return
	}
}

// complete stands for the model call; it returns the tokens used.
func complete(_ context.Context, _ string, maxTokens uint32) uint32 { return maxTokens / 4 }
