package tollgate

import (
	"context"
	"time"

	tollgatev1 "github.com/tollgate-rs/tollgate/clients/go/gen/tollgate/v1"
	"google.golang.org/protobuf/types/known/durationpb"
)

// MaxLeaseIDBytes is the longest lease id Tollgate accepts.
const MaxLeaseIDBytes = 128

// Lease is the lease a [Client.Decide] took with its rates, when the
// [Request] carried a LeaseID and one of the scope's concurrency limits
// matched (see docs/leases.md). Renew it with [Client.RenewLease] while the
// work runs, and give it back with [Client.ReleaseLease].
type Lease struct {
	// Granted is true when the lease is held: the request was allowed. A
	// request the rates denied gave its lease back, and has Granted false.
	Granted bool
	// ID is the lease id, as sent.
	ID string
	// TTL is the time the lease has left, when granted.
	TTL time.Duration
	// ExpiresAt is the lease's expiry on Tollgate's store clock; zero when
	// not held or degraded.
	ExpiresAt time.Time
	// InFlight is the pool's weight held by live leases after the call.
	InFlight uint64
	// Limit is the pool's `concurrency`, and Rule the concurrency limit's
	// name.
	Limit uint64
	Rule  string
	// Degraded is true when Tollgate's store could not answer and the scope
	// fails open: the lease was granted but is not recorded.
	Degraded bool
}

// LeaseTarget names one lease: the scope, identity, operation and
// attributes choose the pool (send the ones the lease was taken with), and
// LeaseID the lease in it.
type LeaseTarget struct {
	Scope      string
	Identity   string
	Operation  string
	Attributes map[string]string
	LeaseID    string
}

// Target is the LeaseTarget of the lease a request asks for.
func (r *Request) Target() LeaseTarget {
	return LeaseTarget{
		Scope:      r.Scope,
		Identity:   r.Identity,
		Operation:  r.Operation,
		Attributes: r.Attributes,
		LeaseID:    r.LeaseID,
	}
}

func (t *LeaseTarget) proto() *tollgatev1.LeaseTarget {
	return &tollgatev1.LeaseTarget{
		Scope:      t.Scope,
		Identity:   t.Identity,
		Operation:  t.Operation,
		Attributes: t.Attributes,
		LeaseId:    t.LeaseID,
	}
}

// AcquireLease takes a lease in the target's pool without charging any
// rate, through tollgate.v1.Leases. ttl 0 means the limit's max_lease;
// weight 0 the limit's weight. A refused acquire is a Lease with Granted
// false and retryAfter (the earliest live lease's expiry: an upper bound
// of the wait) set when a retry can pass. Under [FailOpen], a Tollgate that
// cannot answer gives a granted, Degraded lease; under [FailClosed] an
// [*UnavailableError].
func (c *Client) AcquireLease(ctx context.Context, t LeaseTarget, ttl time.Duration, weight uint32) (lease Lease, retryAfter time.Duration, err error) {
	in := &tollgatev1.AcquireRequest{Target: t.proto(), Weight: weight}
	if ttl != 0 {
		in.Ttl = durationpb.New(ttl)
	}
	var resp *tollgatev1.AcquireResponse
	err = c.call(ctx, func(ctx context.Context) error {
		var err error
		resp, err = c.leases.Acquire(ctx, in)
		return err
	})
	if err != nil {
		if _, err := c.failed(err); err != nil {
			return Lease{}, 0, err
		}
		return Lease{Granted: true, ID: t.LeaseID, Degraded: true}, 0, nil
	}
	lease = Lease{
		Granted:   resp.GetGranted(),
		ID:        t.LeaseID,
		TTL:       resp.GetTtl().AsDuration(),
		ExpiresAt: unixMicros(resp.GetExpiresAtUnixMicros()),
		InFlight:  resp.GetInFlight(),
		Limit:     resp.GetLimit(),
		Rule:      resp.GetRule(),
		Degraded:  resp.GetDegraded(),
	}
	return lease, resp.GetRetryAfter().AsDuration(), nil
}

// RenewLease sets a live lease's expiry to now + ttl on Tollgate's store
// clock (ttl 0: the limit's max_lease). renewed false means the lease is
// gone (it expired or was released): stop the work, or acquire again. The
// failure mode does not apply: when Tollgate cannot answer, the error is an
// [*UnavailableError] and the lease runs on to its expiry.
func (c *Client) RenewLease(ctx context.Context, t LeaseTarget, ttl time.Duration) (renewed bool, err error) {
	in := &tollgatev1.RenewRequest{Target: t.proto()}
	if ttl != 0 {
		in.Ttl = durationpb.New(ttl)
	}
	var resp *tollgatev1.RenewResponse
	err = c.call(ctx, func(ctx context.Context) error {
		var err error
		resp, err = c.leases.Renew(ctx, in)
		return err
	})
	if err != nil {
		return false, err
	}
	return resp.GetRenewed(), nil
}

// ReleaseLease gives a lease back. It is idempotent: an unknown or expired
// lease is fine. The failure mode does not apply: when Tollgate cannot
// answer, the error is an [*UnavailableError] and the slot comes back at
// the lease's expiry.
func (c *Client) ReleaseLease(ctx context.Context, t LeaseTarget) error {
	in := &tollgatev1.ReleaseRequest{Target: t.proto()}
	return c.call(ctx, func(ctx context.Context) error {
		_, err := c.leases.Release(ctx, in)
		return err
	})
}

func leaseFromProto(p *tollgatev1.LeaseGrant) *Lease {
	if p == nil {
		return nil
	}
	return &Lease{
		Granted:   p.GetGranted(),
		ID:        p.GetLeaseId(),
		TTL:       p.GetTtl().AsDuration(),
		ExpiresAt: unixMicros(p.GetExpiresAtUnixMicros()),
		InFlight:  p.GetInFlight(),
		Limit:     p.GetLimit(),
		Rule:      p.GetRule(),
		Degraded:  p.GetDegraded(),
	}
}

func unixMicros(us uint64) time.Time {
	if us == 0 {
		return time.Time{}
	}
	return time.UnixMicro(int64(us))
}
