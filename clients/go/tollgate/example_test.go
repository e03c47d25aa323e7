package tollgate_test

import (
	"context"
	"errors"
	"log"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

func Example() {
	client, err := tollgate.Dial("127.0.0.1:50051",
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
