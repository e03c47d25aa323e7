package tollgate

import (
	"fmt"
	"time"

	tollgatev1 "github.com/tollgate-rs/tollgate/clients/go/gen/tollgate/v1"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Priority is how much of a limit's headroom a request may take. A limit
// with `headroom: {normal: 10%, sheddable: 30%}` lets a [PriorityNormal]
// request take all but the last 10% of the bucket (or budget) and a
// [PrioritySheddable] one all but the last 30%, so background work is shed
// before interactive users; [PriorityCritical] may take everything. A
// denial's RetryAfter is exact for the request's priority. Limits without
// headroom treat every priority alike.
type Priority int32

const (
	// PriorityNormal is the default: it may not take headroom.normal.
	PriorityNormal Priority = iota
	// PriorityCritical may take a limit's whole capacity: the user at the
	// screen, a health check.
	PriorityCritical
	// PrioritySheddable is shed first: it may not take headroom.sheddable.
	// Background agents, batch jobs, prefetching.
	PrioritySheddable
)

func (p Priority) String() string {
	switch p {
	case PriorityNormal:
		return "normal"
	case PriorityCritical:
		return "critical"
	case PrioritySheddable:
		return "sheddable"
	default:
		return fmt.Sprintf("Priority(%d)", int32(p))
	}
}

// Request is one question to Tollgate. Tollgate validates it (scope 1 to
// 128 bytes; identity and operation at most 256; at most 16 attributes; no
// control characters) and answers an [*InvalidRequestError] otherwise.
type Request struct {
	// Scope names the rule set: the tenant, MCP server or gateway. Required.
	Scope string
	// Identity is the caller. Empty means anonymous: all anonymous callers
	// of a scope share one bucket.
	Identity string
	// Operation is what the caller does, such as "tools/call:search"; limits
	// with an operations list apply only when one of their globs matches.
	Operation string
	// Cost is the tokens to take; 0 means 1.
	Cost uint32
	// DryRun decides without taking anything.
	DryRun bool
	// Attributes select tiered limits, such as tier=premium.
	Attributes map[string]string
	// Priority is which headroom the request may take; see [Priority].
	Priority Priority
	// SettleWithin, when not zero, makes Cost an estimate: an allowed
	// Decision carries a Reservation, which [Client.Settle] turns into the
	// real cost within this time (after it, the estimate stands). 1ms to
	// the server's reservations.max_settle_within (1h unless set). Only for
	// Decide: a batch cannot reserve.
	SettleWithin time.Duration
	// MaxWait, when not zero, is the longest this caller can wait before
	// proceeding (at most 1h): a limit with max_delay then allows a request
	// it would let through within that time with a Delay instead of
	// denying it. Zero: allowed now or denied, as without shaping.
	MaxWait time.Duration
	// Strike counts this request as a strike in the scope's penalty box
	// whatever it is decided: report a failed login as a DryRun with a
	// Strike.
	Strike bool
	// LeaseID, when not empty, also takes a lease of this id in the scope's
	// concurrency limit that matches, all or nothing with the rates: a full
	// pool denies the request (taking no tokens), and a request the rates
	// deny gives its lease back. The Decision's Lease says what is held. 1
	// to [MaxLeaseIDBytes] bytes; only for Decide. See docs/leases.md.
	LeaseID string
	// LeaseTTL is how long the lease lives unless renewed; zero means the
	// limit's max_lease.
	LeaseTTL time.Duration
}

// Decision is Tollgate's answer, or the client's own under the failure
// policy.
type Decision struct {
	// Allowed is the answer. When true (and not DryRun), Cost was taken from
	// every bucket in Buckets.
	Allowed bool
	// RetryAfter is, on a denial, the earliest wait after which the same
	// request would be allowed if nobody else consumed in between (a lower
	// bound for a bucket shared with others). It is zero when allowed, and
	// on a denial no retry can pass (see Reason), such as a cost over a
	// bucket's capacity.
	RetryAfter time.Duration
	// Limit, Remaining, ResetAfter and Rule describe the most restrictive
	// bucket: the one that denied (the longest RetryAfter), else the one
	// with the fewest tokens left. Limit is 0 and Rule empty when no rule
	// applied.
	Limit      uint64
	Remaining  uint64
	ResetAfter time.Duration
	Rule       string
	// Buckets lists every bucket that applied, in the order of the scope's
	// limits.
	Buckets []Bucket
	// Degraded is true when no bucket counted this request: Tollgate's store
	// was down in a scope that fails open, or Tollgate could not be reached
	// and this client fails open (then Unreachable says why).
	Degraded bool
	// Unreachable is set only on a decision this client made by itself under
	// FailOpen: why Tollgate did not answer. Log it or count it; the request
	// was allowed.
	Unreachable error
	// Reason is Tollgate's short explanation of a denial without RetryAfter.
	Reason string
	// Reservation is set when allowed with SettleWithin: the opaque token
	// to hand [Client.Settle] once the real cost is known. It is empty on a
	// denial, a dry run, and a degraded decision (which took nothing).
	Reservation string
	// Delay is set when allowed for later (the Request had MaxWait and a
	// limit with max_delay admitted it): wait this long, then proceed. Its
	// tokens were taken as of then. Zero: proceed at once.
	Delay time.Duration
	// Banned is true when the caller is in the scope's penalty box (or on
	// its deny list): RetryAfter runs to the ban's end, and nothing was
	// taken. Tell the client it is being abusive, not merely fast.
	Banned bool
	// ConcurrencyLimited is true when the request's concurrency limit had
	// no room for its lease (the server's
	// DENIAL_REASON_CONCURRENCY_LIMITED): then Rule and Limit are that
	// limit's, and RetryAfter is an upper bound of the wait (the earliest
	// live lease's expiry), not a lower one. See LeaseDenied.
	ConcurrencyLimited bool
	// Lease is set when the Request carried a LeaseID and one of the
	// scope's concurrency limits matched.
	Lease *Lease
}

// Settlement is what [Client.Settle] did.
type Settlement struct {
	// Estimate is the cost the reservation was made with: what it took
	// from each bucket before the settle applied the difference.
	Estimate uint64
	// Buckets lists every bucket the reservation charged, after the settle,
	// in the order of the scope's limits. Remaining is 0 while a bucket is
	// in debt (the real cost was over the estimate and over what it held).
	Buckets []Bucket
}

// Bucket is the state of one bucket that applied to a request.
type Bucket struct {
	// Rule is the name of the limit the bucket belongs to.
	Rule string
	// Limit is the bucket's capacity (its burst).
	Limit uint64
	// Remaining is the whole tokens left after this decision.
	Remaining uint64
	// ResetAfter is the time until the bucket is full again.
	ResetAfter time.Duration
	// RetryAfter is set only when this bucket alone would deny: the time
	// until it holds the request's cost.
	RetryAfter time.Duration
	// Exhausted is true when this bucket did not hold the cost: it is one
	// of the policies a denial violated.
	Exhausted bool
	// RefillPeriod is the time in which the empty bucket refills
	// completely: with Limit, its rate. It is the window w of the
	// RateLimit-Policy field; zero when Tollgate did not report it.
	RefillPeriod time.Duration
}

func (r *Request) proto() *tollgatev1.ShouldAllowRequest {
	p := &tollgatev1.ShouldAllowRequest{
		Scope:      r.Scope,
		Identity:   r.Identity,
		Operation:  r.Operation,
		Cost:       r.Cost,
		DryRun:     r.DryRun,
		Attributes: r.Attributes,
		Priority:   tollgatev1.Priority(r.Priority),
		Strike:     r.Strike,
	}
	// Zero means unset; a negative one goes as it is, for Tollgate to
	// refuse naming settle_within.
	if r.SettleWithin != 0 {
		p.SettleWithin = durationpb.New(r.SettleWithin)
	}
	if r.MaxWait != 0 {
		p.MaxWait = durationpb.New(r.MaxWait)
	}
	p.LeaseId = r.LeaseID
	if r.LeaseTTL != 0 {
		p.LeaseTtl = durationpb.New(r.LeaseTTL)
	}
	return p
}

func decisionFromProto(p *tollgatev1.ShouldAllowResponse) Decision {
	return Decision{
		Allowed:     p.GetAllowed(),
		RetryAfter:  p.GetRetryAfter().AsDuration(),
		Limit:       p.GetLimit(),
		Remaining:   p.GetRemaining(),
		ResetAfter:  p.GetResetAfter().AsDuration(),
		Rule:        p.GetRule(),
		Degraded:    p.GetDegraded(),
		Reason:      p.GetReason(),
		Reservation: p.GetReservation(),
		Buckets:     bucketsFromProto(p.GetBuckets()),
		Delay:       p.GetDelay().AsDuration(),
		Banned:      p.GetDenialReason() == tollgatev1.DenialReason_DENIAL_REASON_BANNED,
		ConcurrencyLimited: p.GetDenialReason() ==
			tollgatev1.DenialReason_DENIAL_REASON_CONCURRENCY_LIMITED,
		Lease: leaseFromProto(p.GetLease()),
	}
}

func settlementFromProto(p *tollgatev1.SettleResponse) Settlement {
	return Settlement{Estimate: p.GetEstimate(), Buckets: bucketsFromProto(p.GetBuckets())}
}

// bucketsFromProto converts bucket states; none gives nil.
func bucketsFromProto(bs []*tollgatev1.BucketStatus) []Bucket {
	if len(bs) == 0 {
		return nil
	}
	out := make([]Bucket, len(bs))
	for i, b := range bs {
		out[i] = Bucket{
			Rule:         b.GetRule(),
			Limit:        b.GetLimit(),
			Remaining:    b.GetRemaining(),
			ResetAfter:   b.GetResetAfter().AsDuration(),
			RetryAfter:   b.GetRetryAfter().AsDuration(),
			Exhausted:    b.GetExhausted(),
			RefillPeriod: b.GetRefillPeriod().AsDuration(),
		}
	}
	return out
}

// DeniedByBatch reports whether this is an entry of an atomic batch that was
// denied only because another entry was: none of its own buckets ran out,
// and it carries neither a RetryAfter nor a Reason of its own. Such an entry
// says nothing about when the batch may pass; the entries that denied do.
func (d *Decision) DeniedByBatch() bool {
	if d.Allowed || d.RetryAfter > 0 || d.Reason != "" {
		return false
	}
	for _, b := range d.Buckets {
		if b.Exhausted {
			return false
		}
	}
	return true
}

// LeaseDenied reports whether the request was denied by its concurrency
// limit: it asked for a lease, the pool was full, and no rate was charged.
// (A request the rates denied has Lease.Granted false too, but is not
// this.) A server older than the denial reason is read by the shape of its
// answer: an ungranted lease and no bucket.
func (d *Decision) LeaseDenied() bool {
	if d.Allowed || d.Banned {
		return false
	}
	return d.ConcurrencyLimited || (d.Lease != nil && !d.Lease.Granted && len(d.Buckets) == 0)
}

// ViolatedPolicies names the rules that denied: the exhausted buckets of
// this decision (or its concurrency limit, when that denied), or none when
// it was allowed.
func (d *Decision) ViolatedPolicies() []string {
	if d.Allowed {
		return nil
	}
	if d.LeaseDenied() && d.Lease.Rule != "" {
		return []string{d.Lease.Rule}
	}
	var out []string
	for _, b := range d.Buckets {
		if b.Exhausted {
			out = append(out, b.Rule)
		}
	}
	if len(out) == 0 && d.Rule != "" {
		out = append(out, d.Rule)
	}
	return out
}
