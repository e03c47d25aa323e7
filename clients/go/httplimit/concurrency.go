package httplimit

import (
	"net/http"
	"strings"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/internal/leasehold"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

// DefaultLeaseTTL is the lease time to live when Concurrency.TTL is 0: a
// proxy that dies mid-request holds its slot for at most this long after
// its last renew. It must not exceed the limit's max_lease (default 5m).
const DefaultLeaseTTL = leasehold.DefaultTTL

// ErrLeaseLost is what Config.OnError hears when a renew found the lease
// gone (it expired, say after a stall longer than its TTL): the response
// goes on, but no longer counts against the concurrency limit.
var ErrLeaseLost = leasehold.ErrLost

// Leaser renews and releases the leases Concurrency takes; *tollgate.Client
// is one.
type Leaser = leasehold.Leaser

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
// usable, else a fresh random one.
func (c *Concurrency) leaseID(r *http.Request) string {
	if c.RequestIDHeader == "" {
		return leasehold.ID("")
	}
	return leasehold.ID(r.Header.Get(c.RequestIDHeader))
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

// leaseDenied reports whether a concurrency limit denied any of ds.
func leaseDenied(ds []tollgate.Decision) bool {
	for i := range ds {
		if ds[i].LeaseDenied() {
			return true
		}
	}
	return false
}
