package httplimit_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/httplimit"
	"github.com/tollgate-rs/tollgate/clients/go/internal/tollgatetest"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

// pool is a scope with a concurrency limit of n, and no rates.
func pool(n int) string {
	return `
scopes:
  - name: demo
    limits:
      - {name: streams, per: scope, concurrency: ` + strconv.Itoa(n) + `, max_lease: 1m}
`
}

// leased serves h behind the middleware with Concurrency on.
func leased(t *testing.T, addr string, c httplimit.Concurrency, h http.Handler, opts ...tollgate.Option) *httptest.Server {
	t.Helper()
	return leasedWith(t, addr, httplimit.Config{Scope: httplimit.Static("demo"), Concurrency: &c}, h, opts...)
}

func leasedWith(t *testing.T, addr string, cfg httplimit.Config, h http.Handler, opts ...tollgate.Option) *httptest.Server {
	t.Helper()
	// Generous: the machine running the tests may be busy.
	opts = append([]tollgate.Option{tollgate.WithDeadline(2 * time.Second)}, opts...)
	c, err := tollgate.NewClient(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	limit, err := httplimit.New(c, cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(limit(h))
	t.Cleanup(srv.Close)
	return srv
}

// gate is a slow handler: each request waits until open is closed, and the
// most running at once is counted.
type gate struct {
	open    chan struct{}
	running atomic.Int32
	most    atomic.Int32
	entered chan struct{}
}

func newGate() *gate { return &gate{open: make(chan struct{}), entered: make(chan struct{}, 100)} }

func (g *gate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := g.running.Add(1)
	defer g.running.Add(-1)
	for {
		m := g.most.Load()
		if n <= m || g.most.CompareAndSwap(m, n) {
			break
		}
	}
	g.entered <- struct{}{}
	select {
	case <-g.open:
	case <-r.Context().Done():
	}
	w.WriteHeader(http.StatusOK)
}

// wait waits until n requests entered the handler.
func (g *gate) wait(t *testing.T, n int) {
	t.Helper()
	for i := range n {
		select {
		case <-g.entered:
		case <-time.After(10 * time.Second):
			t.Fatalf("only %d of %d requests reached the handler", i, n)
		}
	}
}

func waitFor(t *testing.T, what string, within time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestConcurrencyHoldsTwoOfSixAtOnceAndReleasesThem(t *testing.T) {
	tg := tollgatetest.Start(t, pool(2))
	g := newGate()
	srv := leased(t, tg.Addr, httplimit.Concurrency{TTL: 20 * time.Second}, g)

	type answer struct {
		status int
		header http.Header
	}
	answers := make(chan answer, 6)
	var wg sync.WaitGroup
	for range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Get(srv.URL + "/stream")
			if err != nil {
				t.Error(err)
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			answers <- answer{resp.StatusCode, resp.Header}
		}()
	}
	// Four are refused while two run.
	refused := 0
	for refused < 4 {
		select {
		case a := <-answers:
			if a.status != http.StatusTooManyRequests {
				t.Fatalf("status %d while the pool is full, want 429", a.status)
			}
			// The earliest live lease expires within its TTL: 20 s.
			if ra, err := strconv.Atoi(a.header.Get("Retry-After")); err != nil || ra < 1 || ra > 20 {
				t.Errorf("Retry-After %q: want whole seconds in 1..20", a.header.Get("Retry-After"))
			}
			if p := a.header.Get("RateLimit-Policy"); p != `"streams";q=2;qu="concurrent-requests"` {
				t.Errorf("RateLimit-Policy %q", p)
			}
			if !strings.HasPrefix(a.header.Get("RateLimit"), `"streams";r=0;t=`) {
				t.Errorf("RateLimit %q", a.header.Get("RateLimit"))
			}
			refused++
		case <-time.After(30 * time.Second):
			t.Fatalf("only %d of 6 refused", refused)
		}
	}
	if got := g.running.Load(); got != 2 {
		t.Fatalf("%d handled at once, want 2", got)
	}
	close(g.open)
	wg.Wait()
	close(answers)
	for a := range answers {
		if a.status != http.StatusOK {
			t.Errorf("a held request answered %d", a.status)
		}
	}
	if g.most.Load() != 2 {
		t.Errorf("at most %d ran at once, want 2", g.most.Load())
	}

	// Released: the pool takes two again at once, and not a third.
	g2 := newGate()
	srv2 := leased(t, tg.Addr, httplimit.Concurrency{TTL: 20 * time.Second}, g2)
	var wg2 sync.WaitGroup
	for range 2 {
		wg2.Add(1)
		go func() {
			defer wg2.Done()
			if resp := get(t, srv2.URL, ""); resp.StatusCode != http.StatusOK {
				t.Errorf("after the release: %d", resp.StatusCode)
			}
		}()
	}
	g2.wait(t, 2)
	if resp := get(t, srv2.URL, ""); resp.StatusCode != http.StatusTooManyRequests {
		t.Errorf("a third while two run again: %d", resp.StatusCode)
	}
	close(g2.open)
	wg2.Wait()
}

func TestAnAllowedRequestSaysWhatThePoolHasLeft(t *testing.T) {
	tg := tollgatetest.Start(t, pool(2))
	srv := leased(t, tg.Addr, httplimit.Concurrency{}, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	for range 3 {
		resp := get(t, srv.URL, "")
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d", resp.StatusCode)
		}
		if got := resp.Header.Get("RateLimit"); got != `"streams";r=1` {
			t.Errorf("RateLimit %q, want one slot left while this one runs", got)
		}
	}
}

// A stream three times longer than the lease's TTL keeps its slot: the
// lease is renewed, so a request during the stream is still refused.
func TestAStreamLongerThanThreeTTLsKeepsItsLease(t *testing.T) {
	tg := tollgatetest.Start(t, pool(1))
	const ttl = 600 * time.Millisecond
	var lost atomic.Int32
	stream := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/stream" {
			return
		}
		for i := 0; i < 40; i++ { // 4 s: over 6 TTLs
			_, _ = io.WriteString(w, "token ")
			w.(http.Flusher).Flush()
			time.Sleep(100 * time.Millisecond)
		}
	})
	srv := leasedWith(t, tg.Addr, httplimit.Config{
		Scope:       httplimit.Static("demo"),
		Concurrency: &httplimit.Concurrency{TTL: ttl},
		OnError: func(_ *http.Request, err error) {
			if err == httplimit.ErrLeaseLost {
				lost.Add(1)
			}
		},
	}, stream)

	resp, err := http.Get(srv.URL + "/stream")
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("the stream: %d", resp.StatusCode)
	}
	start := time.Now()
	time.Sleep(3*ttl + 200*time.Millisecond)
	during := get(t, srv.URL+"/other", "")
	if time.Since(start) > 3500*time.Millisecond {
		t.Skip("the machine is too slow to ask within the stream")
	}
	if during.StatusCode != http.StatusTooManyRequests {
		t.Errorf("after %v of the stream (ttl %v), another request got %d, want 429", time.Since(start), ttl, during.StatusCode)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if strings.Count(string(body), "token") != 40 {
		t.Errorf("the stream was cut: %q", body)
	}
	if lost.Load() != 0 {
		t.Errorf("%d renewals found the lease lost", lost.Load())
	}
	if after := get(t, srv.URL+"/other", ""); after.StatusCode != http.StatusOK {
		t.Errorf("after the stream: %d", after.StatusCode)
	}
}

// A client that goes away frees its slot at once, even while the handler
// (which ignores the cancellation) runs on.
func TestAClientThatGoesAwayFreesItsSlotPromptly(t *testing.T) {
	tg := tollgatetest.Start(t, pool(1))
	entered := make(chan struct{}, 1)
	stubborn := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/fast" {
			return
		}
		_, _ = io.WriteString(w, "first ")
		w.(http.Flusher).Flush()
		entered <- struct{}{}
		time.Sleep(3 * time.Second)
	})
	srv := leased(t, tg.Addr, httplimit.Concurrency{TTL: time.Minute}, stubborn)

	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL+"/slow", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	<-entered
	if r := get(t, srv.URL+"/fast", ""); r.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("while the slow one runs: %d", r.StatusCode)
	}
	cancel()
	resp.Body.Close()
	gone := time.Now()
	waitFor(t, "the slot to come back", 3*time.Second, func() bool {
		return get(t, srv.URL+"/fast", "").StatusCode == http.StatusOK
	})
	t.Logf("the slot came back %v after the client left (lease TTL 1m)", time.Since(gone))
}

func TestAFullBackendPoolCanAnswer503(t *testing.T) {
	fullPoolAnswers503(t, pool(1))
}

// fullPoolAnswers503 serves config's scope "demo", whose pool holds one,
// behind a middleware that answers a full pool 503: one request holds the
// slot, and the next must get 503 with a Retry-After.
func fullPoolAnswers503(t *testing.T, config string) {
	t.Helper()
	tg := tollgatetest.Start(t, config)
	g := newGate()
	srv := leased(t, tg.Addr, httplimit.Concurrency{DenyStatus: http.StatusServiceUnavailable}, g)
	done := make(chan struct{})
	go func() { defer close(done); get(t, srv.URL, "") }()
	g.wait(t, 1)
	resp := get(t, srv.URL, "")
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Errorf("status %d, Retry-After %q: want the pool's 503 with one", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	close(g.open)
	<-done
}

// A full pool beside rates that have room is the pool's denial: its own
// status, not the rates' 429 (the answer carries the rates' buckets too).
func TestAFullPoolBesideRatesAnswersThePoolsStatus(t *testing.T) {
	fullPoolAnswers503(t, pool(1)+`      - {name: per-scope, per: scope, capacity: 100, refill_period: 1h}
`)
}

// Rates and the lease are all or nothing: a request the rates deny gives
// its lease back.
func TestARequestTheRatesDenyHoldsNoSlot(t *testing.T) {
	tg := tollgatetest.Start(t, `
scopes:
  - name: demo
    limits:
      - {name: streams, per: identity, concurrency: 1}
      - {name: per-user, per: identity, capacity: 1, refill_period: 1h}
`)
	srv := leasedWith(t, tg.Addr, httplimit.Config{
		Scope: httplimit.Static("demo"), Identity: httplimit.Header("X-User"),
		Concurrency: &httplimit.Concurrency{},
	}, http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	if r := get(t, srv.URL, "bob"); r.StatusCode != http.StatusOK {
		t.Fatalf("first: %d", r.StatusCode)
	}
	r := get(t, srv.URL, "bob")
	if r.StatusCode != http.StatusTooManyRequests || r.Header.Get("RateLimit") == "" || strings.Contains(r.Header.Get("RateLimit"), "streams") {
		t.Fatalf("second: %d %q, want a 429 of the rates", r.StatusCode, r.Header.Get("RateLimit"))
	}
	// Bob's pool is empty: the denied request gave its lease back.
	c, err := tollgate.NewClient(tg.Addr, tollgate.WithDeadline(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	lease, _, err := c.AcquireLease(context.Background(), tollgate.LeaseTarget{Scope: "demo", Identity: "bob", LeaseID: "probe"}, time.Second, 0)
	if err != nil || !lease.Granted || lease.InFlight != 1 {
		t.Errorf("bob's pool after a denial: %+v, %v", lease, err)
	}
}

func TestALeaseFailsOpenWithTollgateDown(t *testing.T) {
	addr, err := tollgatetest.FreeAddr()
	if err != nil {
		t.Fatal(err)
	}
	srv := leased(t, addr, httplimit.Concurrency{}, http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}),
		tollgate.WithDeadline(200*time.Millisecond))
	for range 3 {
		if r := get(t, srv.URL, ""); r.StatusCode != http.StatusOK {
			t.Errorf("fail-open with no Tollgate: %d", r.StatusCode)
		}
	}
}

func TestConcurrencyNeedsALeaserAndAKnownStatus(t *testing.T) {
	c, err := tollgate.NewClient("127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = httplimit.New(c, httplimit.Config{Scope: httplimit.Static("demo"), Concurrency: &httplimit.Concurrency{DenyStatus: 500}})
	if err == nil || !strings.Contains(err.Error(), "DenyStatus") {
		t.Errorf("DenyStatus 500: %v", err)
	}
}

// A lease Tollgate no longer knows (here: it restarted, and its embedded
// store with it) is reported lost at the next renew, and the stream it
// covered goes on to its end, unleased.
func TestALostLeaseIsReportedAndTheResponseGoesOn(t *testing.T) {
	tg := tollgatetest.Start(t, pool(1))
	lost := make(chan struct{}, 10)
	stream := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for i := 0; i < 50; i++ { // 5 s
			_, _ = io.WriteString(w, "token ")
			w.(http.Flusher).Flush()
			time.Sleep(100 * time.Millisecond)
		}
	})
	srv := leasedWith(t, tg.Addr, httplimit.Config{
		Scope:       httplimit.Static("demo"),
		Concurrency: &httplimit.Concurrency{TTL: 900 * time.Millisecond},
		OnError: func(_ *http.Request, err error) {
			if errors.Is(err, httplimit.ErrLeaseLost) {
				lost <- struct{}{}
			}
		},
	}, stream)
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := tg.Restart(); err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil || strings.Count(string(body), "token") != 50 {
		t.Fatalf("the stream after its lease was lost: %d tokens, %v", strings.Count(string(body), "token"), err)
	}
	select {
	case <-lost:
	default:
		t.Fatal("no renew reported the lease lost")
	}
	if len(lost) > 0 {
		t.Errorf("%d more reports: renewing should stop at the first", len(lost))
	}
}

// With RequestIDHeader, the header's value is the lease id: two requests
// sending one id share one lease (which is why it is only for a header a
// trusted proxy sets), and a request with another id is refused.
func TestRequestIDHeaderNamesTheLease(t *testing.T) {
	tg := tollgatetest.Start(t, pool(1))
	g := newGate()
	srv := leased(t, tg.Addr, httplimit.Concurrency{RequestIDHeader: "X-Request-Id"}, g)
	send := func(id string) int {
		req, _ := http.NewRequest("GET", srv.URL, nil)
		req.Header.Set("X-Request-Id", id)
		return do(t, http.DefaultClient, req).StatusCode
	}
	done := make(chan int, 2)
	go func() { done <- send("req-1") }()
	g.wait(t, 1)
	go func() { done <- send("req-1") }()
	g.wait(t, 1)
	if got := send("req-2"); got != http.StatusTooManyRequests {
		t.Errorf("another id while req-1 holds the slot: %d", got)
	}
	close(g.open)
	for range 2 {
		if s := <-done; s != http.StatusOK {
			t.Errorf("a request of req-1: %d", s)
		}
	}
}
