package tollgate_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/internal/tollgatetest"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
)

const perUser = `
scopes:
  - name: demo
    limits:
      - name: per-user
        per: identity
        capacity: 2
        refill_period: 1s
`

func newClient(t *testing.T, addr string, opts ...tollgate.Option) *tollgate.Client {
	t.Helper()
	c, err := tollgate.NewClient(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func decide(t *testing.T, c *tollgate.Client, req tollgate.Request) tollgate.Decision {
	t.Helper()
	d, err := c.Decide(context.Background(), req)
	if err != nil {
		t.Fatalf("Decide(%+v): %v", req, err)
	}
	return d
}

func TestAllowDenyAndAllowAgainAfterRetryAfter(t *testing.T) {
	srv := tollgatetest.Start(t, perUser)
	c := newClient(t, srv.Addr)
	req := tollgate.Request{Scope: "demo", Identity: "alice"}

	for want := uint64(1); ; want-- {
		d := decide(t, c, req)
		if !d.Allowed || d.Degraded || d.Remaining != want || d.Limit != 2 || d.Rule != "per-user" {
			t.Fatalf("call leaving %d: got %+v", want, d)
		}
		if want == 0 {
			break
		}
	}
	denied := decide(t, c, req)
	if denied.Allowed || denied.RetryAfter <= 0 || denied.RetryAfter > 500*time.Millisecond {
		t.Fatalf("third call: want a denial with 0 < retry_after <= 500ms, got %+v", denied)
	}
	if got := denied.ViolatedPolicies(); len(got) != 1 || got[0] != "per-user" {
		t.Fatalf("violated policies: %v", got)
	}
	if other := decide(t, c, tollgate.Request{Scope: "demo", Identity: "bob"}); !other.Allowed {
		t.Fatalf("another identity has its own bucket: %+v", other)
	}
	time.Sleep(denied.RetryAfter)
	if again := decide(t, c, req); !again.Allowed {
		t.Fatalf("after retry_after: %+v", again)
	}
}

// A connection the caller made is the caller's: clients built on it share
// it, and closing one of them leaves it open for the others.
func TestAClientFromTheCallersConnectionLeavesItOpen(t *testing.T) {
	// An hour's refill: no token comes back between the two calls, however
	// slow the machine.
	srv := tollgatetest.Start(t, `
scopes:
  - name: demo
    limits:
      - name: per-user
        per: identity
        capacity: 2
        refill_period: 1h
`)
	conn, err := grpc.NewClient(srv.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	first := tollgate.NewClientFromConn(conn, tollgate.WithDeadline(2*time.Second))
	req := tollgate.Request{Scope: "demo", Identity: "alice"}
	if d := decide(t, first, req); !d.Allowed || d.Remaining != 1 {
		t.Fatalf("first call: %+v", d)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	if st := conn.GetState(); st == connectivity.Shutdown {
		t.Fatal("Close shut the caller's connection down")
	}
	second := tollgate.NewClientFromConn(conn, tollgate.WithDeadline(2*time.Second))
	if d := decide(t, second, req); !d.Allowed || d.Remaining != 0 {
		t.Fatalf("second call, on the same connection: %+v", d)
	}
}

func TestBatchDecidesEachEntryInOrder(t *testing.T) {
	srv := tollgatetest.Start(t, perUser)
	c := newClient(t, srv.Addr)
	req := tollgate.Request{Scope: "demo", Identity: "alice"}
	ds, err := c.DecideBatch(context.Background(), []tollgate.Request{req, req, req, {Scope: "demo", Identity: "bob"}})
	if err != nil {
		t.Fatal(err)
	}
	got := []bool{ds[0].Allowed, ds[1].Allowed, ds[2].Allowed, ds[3].Allowed}
	if want := []bool{true, true, false, true}; !slices.Equal(got, want) {
		t.Fatalf("allowed = %v, want %v", got, want)
	}
	if ds[2].RetryAfter <= 0 {
		t.Fatalf("denied entry has no retry_after: %+v", ds[2])
	}
}

// Two operations of one caller, with refill periods long enough that nothing
// refills while a test runs: any token a test sees missing was taken.
const perOperation = `
scopes:
  - name: demo
    limits:
      - name: per-op
        per: identity_operation
        capacity: 2
        refill_period: 1h
      - name: per-user
        per: identity
        capacity: 10
        refill_period: 1h
`

// remaining is what each bucket of d has left, by rule.
func remaining(d tollgate.Decision) map[string]uint64 {
	out := map[string]uint64{}
	for _, b := range d.Buckets {
		out[b.Rule] = b.Remaining
	}
	return out
}

func TestAnAtomicBatchDeniedByOneEntryTakesNothingFromAny(t *testing.T) {
	srv := tollgatetest.Start(t, perOperation)
	c := newClient(t, srv.Addr)
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		decide(t, c, tollgate.Request{Scope: "demo", Identity: "alice", Operation: "b"})
	}
	// "a" has room; "b" has none, so the batch is denied whole.
	batch := []tollgate.Request{
		{Scope: "demo", Identity: "alice", Operation: "a"},
		{Scope: "demo", Identity: "alice", Operation: "b"},
	}
	ds, err := c.DecideBatchAtomic(ctx, batch)
	if err != nil {
		t.Fatal(err)
	}
	if ds[0].Allowed || ds[1].Allowed {
		t.Fatalf("want both entries denied: %+v", ds)
	}
	if !ds[0].DeniedByBatch() || ds[0].RetryAfter != 0 {
		t.Fatalf("entry a was denied only by b, and has no wait of its own: %+v", ds[0])
	}
	if ds[1].RetryAfter <= 0 || !slices.Equal(ds[1].ViolatedPolicies(), []string{"per-op"}) {
		t.Fatalf("entry b should carry the wait and name per-op: %+v", ds[1])
	}
	// a's tokens are untouched: one call of a leaves 2-1 of per-op and
	// 8-1 of per-user (the two b calls took 2 of 10).
	if got := remaining(decide(t, c, batch[0])); got["per-op"] != 1 || got["per-user"] != 7 {
		t.Fatalf("after the refused batch, a call of a left %v, want per-op 1 and per-user 7", got)
	}

	// The control: without atomic, the same batch lets a take its token
	// although the batch as a whole was refused.
	for i := 0; i < 2; i++ {
		decide(t, c, tollgate.Request{Scope: "demo", Identity: "bob", Operation: "b"})
	}
	bobs := []tollgate.Request{
		{Scope: "demo", Identity: "bob", Operation: "a"},
		{Scope: "demo", Identity: "bob", Operation: "b"},
	}
	if ds, err := c.DecideBatch(ctx, bobs); err != nil || !ds[0].Allowed || ds[1].Allowed {
		t.Fatalf("non-atomic batch: %+v, %v", ds, err)
	}
	if got := remaining(decide(t, c, bobs[0])); got["per-op"] != 0 || got["per-user"] != 6 {
		t.Fatalf("after a non-atomic batch, a call of a left %v, want per-op 0 and per-user 6", got)
	}
}

func TestAnAtomicBatchSumsTheCostOfABucketItsEntriesShare(t *testing.T) {
	srv := tollgatetest.Start(t, perOperation)
	c := newClient(t, srv.Addr)
	// Each entry alone fits per-user's 10; together they need 12.
	batch := []tollgate.Request{
		{Scope: "demo", Identity: "alice", Operation: "a", Cost: 2},
		{Scope: "demo", Identity: "alice", Operation: "b", Cost: 2},
	}
	for i := range batch {
		batch = append(batch, tollgate.Request{Scope: "demo", Identity: "alice", Operation: fmt.Sprintf("c%d", i), Cost: 2},
			tollgate.Request{Scope: "demo", Identity: "alice", Operation: fmt.Sprintf("d%d", i), Cost: 2})
	}
	ds, err := c.DecideBatchAtomic(context.Background(), batch)
	if err != nil {
		t.Fatal(err)
	}
	for i, d := range ds {
		if d.Allowed {
			t.Fatalf("entry %d allowed; 6 entries of cost 2 need 12 of per-user's 10: %+v", i, d)
		}
	}
	if got := remaining(decide(t, c, batch[0])); got["per-user"] != 8 {
		t.Fatalf("after the refused batch, per-user has %d left, want 10-2", got["per-user"])
	}
}

func TestBucketsReportTheirRefillPeriod(t *testing.T) {
	srv := tollgatetest.Start(t, perOperation)
	c := newClient(t, srv.Addr)
	d := decide(t, c, tollgate.Request{Scope: "demo", Identity: "alice", Operation: "a"})
	if len(d.Buckets) != 2 || d.Buckets[0].RefillPeriod != time.Hour || d.Buckets[1].RefillPeriod != time.Hour {
		t.Fatalf("buckets: %+v", d.Buckets)
	}
}

func TestDryRunTakesNothing(t *testing.T) {
	srv := tollgatetest.Start(t, perUser)
	c := newClient(t, srv.Addr)
	for i := 0; i < 5; i++ {
		if d := decide(t, c, tollgate.Request{Scope: "demo", Identity: "alice", DryRun: true}); !d.Allowed {
			t.Fatalf("dry run %d: %+v", i, d)
		}
	}
	if d := decide(t, c, tollgate.Request{Scope: "demo", Identity: "alice"}); !d.Allowed || d.Remaining != 1 {
		t.Fatalf("the first real call after the dry runs should leave 1 of 2: %+v", d)
	}
}

func TestCostOverCapacityIsDeniedWithAReasonAndNoRetryAfter(t *testing.T) {
	srv := tollgatetest.Start(t, perUser)
	c := newClient(t, srv.Addr)
	d := decide(t, c, tollgate.Request{Scope: "demo", Identity: "alice", Cost: 3})
	if d.Allowed || d.RetryAfter != 0 || d.Reason == "" {
		t.Fatalf("want a denial with a reason and no retry_after, got %+v", d)
	}
}

func TestInvalidInputIsAnErrorWhateverTheFailureMode(t *testing.T) {
	srv := tollgatetest.Start(t, perUser)
	c := newClient(t, srv.Addr, tollgate.WithFailureMode(tollgate.FailOpen))
	_, err := c.Decide(context.Background(), tollgate.Request{Scope: "demo", Identity: strings.Repeat("x", 300)})
	var invalid *tollgate.InvalidRequestError
	if !errors.As(err, &invalid) || !strings.HasPrefix(invalid.Message, "identity") {
		t.Fatalf("want an InvalidRequestError naming identity, got %v", err)
	}
}

func TestFailOpenAllowsAndSaysWhyWhenTollgateIsStopped(t *testing.T) {
	srv := tollgatetest.Start(t, perUser)
	c := newClient(t, srv.Addr)
	decide(t, c, tollgate.Request{Scope: "demo", Identity: "alice"})
	srv.Stop()

	for i := 0; i < 10; i++ {
		start := time.Now()
		d, err := c.Decide(context.Background(), tollgate.Request{Scope: "demo", Identity: "alice"})
		if err != nil || !d.Allowed || !d.Degraded || d.Unreachable == nil {
			t.Fatalf("call %d: want an allowed, degraded decision with a cause, got %+v, %v", i, d, err)
		}
		if took := time.Since(start); took > tollgate.DefaultDeadline+50*time.Millisecond {
			t.Fatalf("call %d took %s, more than the deadline", i, took)
		}
	}
}

func TestFailClosedReturnsUnavailableWhenTollgateIsStopped(t *testing.T) {
	srv := tollgatetest.Start(t, perUser)
	c := newClient(t, srv.Addr, tollgate.WithFailureMode(tollgate.FailClosed))
	decide(t, c, tollgate.Request{Scope: "demo", Identity: "alice"})
	srv.Stop()

	_, err := c.Decide(context.Background(), tollgate.Request{Scope: "demo", Identity: "alice"})
	var unavailable *tollgate.UnavailableError
	if !errors.As(err, &unavailable) {
		t.Fatalf("want an UnavailableError, got %v", err)
	}
	ds, err := c.DecideBatch(context.Background(), []tollgate.Request{{Scope: "demo"}})
	if !errors.As(err, &unavailable) || ds != nil {
		t.Fatalf("batch: want an UnavailableError, got %v, %v", ds, err)
	}
}

func TestTheClientRecoversWhenTollgateComesBack(t *testing.T) {
	srv := tollgatetest.Start(t, perUser)
	c := newClient(t, srv.Addr)
	decide(t, c, tollgate.Request{Scope: "demo", Identity: "alice"})
	srv.Stop()
	if d := decide(t, c, tollgate.Request{Scope: "demo", Identity: "alice"}); !d.Degraded {
		t.Fatalf("with Tollgate stopped: %+v", d)
	}
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		d := decide(t, c, tollgate.Request{Scope: "demo", Identity: "alice"})
		if !d.Degraded {
			if d.Limit != 2 {
				t.Fatalf("after restart: %+v", d)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("still degraded 5s after Tollgate came back: %v", d.Unreachable)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A Tollgate that accepts connections and never answers is the worst case:
// each call costs a whole deadline until the breaker opens, and then none.
func TestAHungTollgateCostsAFewDeadlinesThenNothing(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			defer conn.Close() // held open, never answered
		}
	}()
	const deadline = 50 * time.Millisecond
	c := newClient(t, l.Addr().String(), tollgate.WithDeadline(deadline), tollgate.WithCircuitBreaker(3, time.Minute))
	for i := 0; i < 3; i++ {
		start := time.Now()
		d := decide(t, c, tollgate.Request{Scope: "demo"})
		if took := time.Since(start); !d.Degraded || took < deadline || took > 4*deadline {
			t.Fatalf("call %d: degraded=%v after %s, want one deadline", i, d.Degraded, took)
		}
	}
	start := time.Now()
	d := decide(t, c, tollgate.Request{Scope: "demo"})
	if took := time.Since(start); !d.Degraded || took > 25*time.Millisecond {
		t.Fatalf("with the breaker open: degraded=%v after %s, want at once", d.Degraded, took)
	}
	if !strings.Contains(d.Unreachable.Error(), "in a row failed") {
		t.Fatalf("cause should say the call was skipped: %v", d.Unreachable)
	}
}

func TestACallerThatGaveUpIsNotAnOutage(t *testing.T) {
	srv := tollgatetest.Start(t, perUser)
	c := newClient(t, srv.Addr)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.Decide(ctx, tollgate.Request{Scope: "demo"}); !errors.Is(err, context.Canceled) {
		t.Fatalf("want context.Canceled, got %v", err)
	}
}
