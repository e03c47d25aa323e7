package tollgate_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/internal/tollgatetest"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

// Refills over an hour, so no whole token comes back while a test runs: a
// count seen is exactly what was taken and given back.
const aiLimits = `
scopes:
  - name: llm
    limits:
      - name: tokens
        per: identity
        capacity: 100
        refill_period: 1h
  - name: agents
    limits:
      - name: shared
        per: identity
        capacity: 10
        refill_period: 1h
        headroom: { normal: 10%, sheddable: 30% }
`

// reserve asks for estimate tokens of who in scope llm, to settle within a
// minute, and returns the reservation of the allowed decision.
func reserve(t *testing.T, c *tollgate.Client, who string, estimate uint32) string {
	t.Helper()
	d := decide(t, c, tollgate.Request{Scope: "llm", Identity: who, Cost: estimate, SettleWithin: time.Minute})
	if !d.Allowed || d.Degraded || d.Reservation == "" {
		t.Fatalf("want an allowed decision with a reservation, got %+v", d)
	}
	return d.Reservation
}

// left is what who has left in scope llm, from a dry run.
func left(t *testing.T, c *tollgate.Client, who string) uint64 {
	t.Helper()
	return decide(t, c, tollgate.Request{Scope: "llm", Identity: who, DryRun: true}).Remaining
}

func TestAReservationSettledForLessGivesTheDifferenceBack(t *testing.T) {
	srv := tollgatetest.Start(t, aiLimits)
	c := newClient(t, srv.Addr, tollgate.WithDeadline(2*time.Second))
	r := reserve(t, c, "alice", 80)
	if got := left(t, c, "alice"); got != 20 {
		t.Fatalf("after reserving 80 of 100: %d left", got)
	}
	s, err := c.Settle(context.Background(), r, 30)
	if err != nil {
		t.Fatal(err)
	}
	if s.Estimate != 80 || len(s.Buckets) != 1 || s.Buckets[0].Rule != "tokens" || s.Buckets[0].Remaining != 70 {
		t.Fatalf("settling 80 at 30 should give 50 back, leaving 70: %+v", s)
	}
	if got := left(t, c, "alice"); got != 70 {
		t.Fatalf("after the settle: %d left, want 70", got)
	}
	if d := decide(t, c, tollgate.Request{Scope: "llm", Identity: "alice"}); d.Reservation != "" {
		t.Fatalf("a plain request carries no reservation: %+v", d)
	}
}

func TestASecondSettleIsAlreadySettledAndAForgedTokenIsInvalid(t *testing.T) {
	srv := tollgatetest.Start(t, aiLimits)
	c := newClient(t, srv.Addr, tollgate.WithDeadline(2*time.Second))
	ctx := context.Background()
	r := reserve(t, c, "bob", 10)
	if _, err := c.Settle(ctx, r, 10); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Settle(ctx, r, 0); !errors.Is(err, tollgate.ErrAlreadySettled) {
		t.Fatalf("second settle: want ErrAlreadySettled, got %v", err)
	}
	if got := left(t, c, "bob"); got != 90 {
		t.Fatalf("a refused settle gives nothing back: %d left, want 90", got)
	}
	// One character changed in the middle, where every bit counts.
	forged := []byte(r)
	if i := len(forged) / 2; forged[i] == 'A' {
		forged[i] = 'B'
	} else {
		forged[i] = 'A'
	}
	for _, token := range []string{string(forged), "not-a-reservation", ""} {
		_, err := c.Settle(ctx, token, 0)
		if !errors.Is(err, tollgate.ErrInvalidReservation) || errors.Is(err, tollgate.ErrAlreadySettled) {
			t.Fatalf("settle(%q): want ErrInvalidReservation, got %v", token, err)
		}
	}
}

func TestAnExpiredReservationIsRefusedAndItsEstimateStands(t *testing.T) {
	srv := tollgatetest.Start(t, aiLimits)
	c := newClient(t, srv.Addr, tollgate.WithDeadline(2*time.Second))
	d := decide(t, c, tollgate.Request{Scope: "llm", Identity: "carol", Cost: 40, SettleWithin: 50 * time.Millisecond})
	time.Sleep(150 * time.Millisecond)
	if _, err := c.Settle(context.Background(), d.Reservation, 0); !errors.Is(err, tollgate.ErrReservationExpired) {
		t.Fatalf("want ErrReservationExpired, got %v", err)
	}
	if got := left(t, c, "carol"); got != 60 {
		t.Fatalf("the estimate stands: %d left, want 60", got)
	}
}

func TestASettleWithTollgateStoppedIsUnavailableEvenWhenFailingOpen(t *testing.T) {
	srv := tollgatetest.Start(t, aiLimits)
	c := newClient(t, srv.Addr, tollgate.WithDeadline(2*time.Second), tollgate.WithFailureMode(tollgate.FailOpen))
	r := reserve(t, c, "dave", 10)
	srv.Stop()

	s, err := c.Settle(context.Background(), r, 5)
	var unavailable *tollgate.UnavailableError
	if !errors.As(err, &unavailable) {
		t.Fatalf("want an UnavailableError to retry, got %+v, %v", s, err)
	}
	// A decision, by contrast, fails open, and reserves nothing.
	d := decide(t, c, tollgate.Request{Scope: "llm", Identity: "dave", Cost: 10, SettleWithin: time.Minute})
	if !d.Allowed || !d.Degraded || d.Reservation != "" {
		t.Fatalf("want a degraded decision without a reservation, got %+v", d)
	}
}

func TestSheddableIsDeniedBeforeCriticalAgainstALimitWithHeadroom(t *testing.T) {
	srv := tollgatetest.Start(t, aiLimits)
	c := newClient(t, srv.Addr, tollgate.WithDeadline(2*time.Second))
	allowed := func(p tollgate.Priority) bool {
		return decide(t, c, tollgate.Request{Scope: "agents", Identity: "crew", Priority: p}).Allowed
	}
	// Of 10, SHEDDABLE must leave 3 and NORMAL 1; CRITICAL may take all.
	for i := 0; i < 7; i++ {
		if !allowed(tollgate.PrioritySheddable) {
			t.Fatalf("sheddable call %d denied with %d left", i, 10-i)
		}
	}
	steps := []struct {
		p    tollgate.Priority
		want bool
	}{
		{tollgate.PrioritySheddable, false}, // 3 left: SHEDDABLE must leave them
		{tollgate.PriorityNormal, true},
		{tollgate.PriorityNormal, true},
		{tollgate.PriorityNormal, false},  // 1 left: NORMAL must leave it
		{tollgate.PriorityCritical, true}, // CRITICAL takes the last
		{tollgate.PriorityCritical, false},
	}
	for i, s := range steps {
		if got := allowed(s.p); got != s.want {
			t.Fatalf("step %d (%s): allowed=%v, want %v", i, s.p, got, s.want)
		}
	}
}
