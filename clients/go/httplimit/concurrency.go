package httplimit

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

// DefaultLeaseTTL is the lease time to live when Concurrency.TTL is 0: a
// proxy that dies mid-request holds its slot for at most this long after
// its last renew. It must not exceed the limit's max_lease (default 5m).
const DefaultLeaseTTL = 30 * time.Second

// ErrLeaseLost is what Config.OnError hears when a renew found the lease
// gone (it expired, say after a stall longer than its TTL): the response
// goes on, but no longer counts against the concurrency limit.
var ErrLeaseLost = errors.New("httplimit: the request's lease was lost; the response goes on unleased")

// Leaser renews and releases the leases Concurrency takes; *tollgate.Client
// is one.
type Leaser interface {
	RenewLease(ctx context.Context, t tollgate.LeaseTarget, ttl time.Duration) (bool, error)
	ReleaseLease(ctx context.Context, t tollgate.LeaseTarget) error
}

// Concurrency makes the middleware hold a lease in the scope's concurrency
// limit (`concurrency: N`, see docs/leases.md) for the lifetime of each
// request. The lease is taken with the rates in the one ShouldAllow (all or
// nothing), renewed every TTL/3 while the handler runs (a streamed response
// included), and released when the handler returns or the client goes
// away, whichever comes first. A scope with no concurrency limit matching
// the request holds nothing. With MCP on, only `tools/call` takes a lease.
type Concurrency struct {
	// TTL is each lease's time to live, renewed every TTL/3; 0 means
	// DefaultLeaseTTL. At most the limit's max_lease (Tollgate refuses a
	// longer one: every request is then a 400).
	TTL time.Duration
	// RequestIDHeader, if set, names a header whose value (1 to 128
	// visible ASCII bytes) becomes the lease id, such as Envoy's
	// X-Request-Id, so that leases can be matched with logs. Set it only
	// when a trusted proxy in front sets that header: two requests with the
	// same id share one lease, so a client choosing its own ids could run
	// any number at once. Otherwise, and when the value is not usable, the
	// lease id is a fresh random one.
	RequestIDHeader string
	// DenyStatus is the status of a request refused because the pool is
	// full: 0 means 429 (Too Many Requests, the caller is over its share),
	// and 503 (Service Unavailable) suits a pool that protects a backend
	// shared by all callers. Both carry Retry-After.
	DenyStatus int
}

func (c *Concurrency) ttl() time.Duration {
	if c.TTL > 0 {
		return c.TTL
	}
	return DefaultLeaseTTL
}

// leaseID is the lease id of r: its request id header, if configured and
// usable, else 16 random bytes in hex.
func (c *Concurrency) leaseID(r *http.Request) string {
	if c.RequestIDHeader != "" {
		if v := r.Header.Get(c.RequestIDHeader); usableID(v) {
			return v
		}
	}
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b[:])
}

func usableID(v string) bool {
	if v == "" || len(v) > tollgate.MaxLeaseIDBytes {
		return false
	}
	for i := 0; i < len(v); i++ {
		if v[i] <= ' ' || v[i] > '~' {
			return false
		}
	}
	return true
}

// leased gives reqs their lease ids when Concurrency is on: the request's
// own, or with MCP on the one entry that is a tools/call (a body of several
// entries is decided as an atomic batch, which cannot take a lease; see
// docs/leases.md).
func (h *handler) leased(r *http.Request, reqs []tollgate.Request, mcpCalls bool) []tollgate.Request {
	c := h.cfg.Concurrency
	if c == nil || len(reqs) != 1 {
		return reqs
	}
	if op := reqs[0].Operation; mcpCalls && op != "tools/call" && !strings.HasPrefix(op, "tools/call:") {
		return reqs
	}
	reqs[0].LeaseID = c.leaseID(r)
	reqs[0].LeaseTTL = c.ttl()
	return reqs
}

// held is the leases to keep for an allowed request: those granted and
// recorded (a degraded lease is not, so there is nothing to renew).
func held(reqs []tollgate.Request, ds []tollgate.Decision) []tollgate.LeaseTarget {
	var out []tollgate.LeaseTarget
	for i := range ds {
		if l := ds[i].Lease; i < len(reqs) && ds[i].Allowed && l != nil && l.Granted && !l.Degraded {
			out = append(out, reqs[i].Target())
		}
	}
	return out
}

// leaseDenied reports whether a concurrency limit denied any of ds.
func leaseDenied(ds []tollgate.Decision) bool {
	for i := range ds {
		if ds[i].LeaseDenied() {
			return true
		}
	}
	return false
}

// holder keeps the leases of one request: renews them until stopped, then
// releases them.
type holder struct {
	stopOnce sync.Once
	stop     chan struct{}
	done     chan struct{}
}

// hold renews targets every ttl/3 until end is called or ctx (the client's
// request) ends, then releases them. A renew that finds a lease gone stops
// renewing it and reports ErrLeaseLost; one Tollgate cannot answer is
// reported and tried again at the next tick.
func hold(ctx context.Context, l Leaser, targets []tollgate.LeaseTarget, ttl time.Duration, report func(error)) *holder {
	h := &holder{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(h.done)
		live := append([]tollgate.LeaseTarget(nil), targets...)
		tick := time.NewTicker(max(ttl/3, time.Millisecond))
		defer tick.Stop()
	renewing:
		for len(live) > 0 {
			select {
			case <-h.stop:
				break renewing
			case <-ctx.Done():
				break renewing
			case <-tick.C:
				live = renew(ctx, l, live, ttl, report)
			}
		}
		// Released on a context of its own: the request's may be cancelled
		// (the client went away), and the slot must come back all the same.
		release, cancel := context.WithTimeout(context.WithoutCancel(ctx), ttl)
		defer cancel()
		for _, t := range targets {
			if err := l.ReleaseLease(release, t); err != nil {
				report(err)
			}
		}
	}()
	return h
}

// renew renews each live lease, and answers those still held.
func renew(ctx context.Context, l Leaser, live []tollgate.LeaseTarget, ttl time.Duration, report func(error)) []tollgate.LeaseTarget {
	kept := live[:0]
	for _, t := range live {
		renewed, err := l.RenewLease(ctx, t, ttl)
		switch {
		case err != nil:
			if ctx.Err() == nil {
				report(err)
			}
			kept = append(kept, t)
		case !renewed:
			report(ErrLeaseLost)
		default:
			kept = append(kept, t)
		}
	}
	return kept
}

// end stops renewing and waits until the leases are released, so that the
// slot is free by the time the response's last byte is sent.
func (h *holder) end() {
	h.stopOnce.Do(func() { close(h.stop) })
	<-h.done
}
