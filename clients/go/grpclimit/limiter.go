// Package grpclimit asks Tollgate about each gRPC call a grpc-go server
// receives: [Limiter.UnaryServerInterceptor] for unary calls, and
// [Limiter.StreamServerInterceptor] for streaming ones, which are decided
// once, when they open.
//
// [Limiter.Limit] has the signature of go-grpc-middleware v2's
// ratelimit.Limiter (Limit(ctx) error), so a *Limiter plugs into
// ratelimit.UnaryServerInterceptor as it is; this module does not depend
// on go-grpc-middleware. That interceptor turns every error into
// RESOURCE_EXHAUSTED with its own message, though, so this package's own
// [Limiter.UnaryServerInterceptor] is the better fit when callers should
// tell a denial (RESOURCE_EXHAUSTED with a RetryInfo detail) from Tollgate
// being down while failing closed (UNAVAILABLE).
//
// Either way, the draft-11 fields travel as response header metadata:
// ratelimit-policy and ratelimit on every decided call, and retry-after on
// a denial. go-grpc-middleware's ratelimit.StreamServerInterceptor takes a
// *Limiter too, with the same loss of UNAVAILABLE.
package grpclimit

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/internal/fields"
	"github.com/tollgate-rs/tollgate/clients/go/internal/leasehold"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Decider is what the limiter asks; *tollgate.Client is one.
type Decider interface {
	Decide(ctx context.Context, req tollgate.Request) (tollgate.Decision, error)
}

// Config says how to turn a call into a question to Tollgate.
type Config struct {
	// Scope names the rule set. Required.
	Scope Extractor
	// Identity is the caller; nil means anonymous (one shared bucket).
	Identity Extractor
	// Operation is what the caller does; nil means none. FullMethod() makes
	// each method its own operation.
	Operation Extractor
	// Cost is the tokens one call takes; nil means 1.
	Cost func(ctx context.Context, fullMethod string) uint32
	// Attributes select tiered limits; nil means none.
	Attributes func(ctx context.Context, fullMethod string) map[string]string
	// LegacyHeaders also sends x-ratelimit-limit, -remaining and -reset.
	LegacyHeaders bool
	// MaxWait turns on shaping: each call asks with this MaxWait (or less:
	// what is left before the call's deadline), and a call a limit with
	// max_delay admits for later is held for its Delay before its handler
	// runs, with ratelimit-delay metadata (seconds, to the millisecond). A
	// call cancelled meanwhile ends with its context's error. Zero: allowed
	// now or denied, as without shaping.
	MaxWait time.Duration
	// OnError, if set, hears of every call Tollgate could not answer
	// (including those let through by fail-open) and every refusal of a
	// call as invalid.
	OnError func(ctx context.Context, fullMethod string, err error)
	// Concurrency, if set, makes UnaryServerInterceptor and
	// StreamServerInterceptor hold a lease in the scope's concurrency limit
	// while each call's handler runs: see Concurrency. Limit cannot (it
	// never hears when the call ends), so it takes none. The Decider must
	// also renew and release leases (*tollgate.Client does).
	Concurrency *Concurrency
}

// Concurrency holds a lease in the scope's concurrency limit (see
// docs/leases.md) for the lifetime of each call: taken with the rates in
// the one ShouldAllow, renewed every TTL/3 while the handler runs (a stream
// included), and released when the handler returns or the call's context
// ends. A full pool is RESOURCE_EXHAUSTED with RetryInfo (the earliest live
// lease's expiry, an upper bound), or UNAVAILABLE with Unavailable set. A
// lost lease is reported to OnError (leases lost: the call goes on).
type Concurrency struct {
	// TTL is each lease's time to live; 0 means 30s. At most the limit's
	// max_lease.
	TTL time.Duration
	// RequestIDMetadata, if set, names request metadata whose value (1 to
	// 128 visible ASCII bytes) becomes the lease id; only when a trusted
	// proxy sets it, since calls sharing an id share one lease. Otherwise
	// the id is random.
	RequestIDMetadata string
	// Unavailable answers UNAVAILABLE instead of RESOURCE_EXHAUSTED when
	// the pool is full: for a pool protecting a backend shared by all
	// callers.
	Unavailable bool
}

// Limiter decides gRPC calls with Tollgate.
type Limiter struct {
	decider Decider
	// leaser is the decider as a Leaser, when Concurrency is on.
	leaser leasehold.Leaser
	cfg    Config
}

// New returns a Limiter. It fails only on a Config without a Scope.
func New(d Decider, cfg Config) (*Limiter, error) {
	if d == nil {
		return nil, errors.New("grpclimit: no Decider")
	}
	if cfg.Scope == nil {
		return nil, errors.New("grpclimit: Config.Scope is required")
	}
	l := &Limiter{decider: d, cfg: cfg}
	if cfg.Concurrency != nil {
		var ok bool
		if l.leaser, ok = d.(leasehold.Leaser); !ok {
			return nil, errors.New("grpclimit: Config.Concurrency needs a Decider that renews and releases leases")
		}
	}
	return l, nil
}

// Limit decides the call whose server context ctx is, and returns nil to
// let it proceed or a gRPC status error: RESOURCE_EXHAUSTED (with RetryInfo
// and QuotaFailure details) on a denial, UNAVAILABLE when Tollgate is down
// and the client fails closed, INVALID_ARGUMENT for input Tollgate or an
// extractor refuses. It is go-grpc-middleware v2's ratelimit.Limiter.
func (l *Limiter) Limit(ctx context.Context) error {
	method, _ := grpc.Method(ctx)
	return l.limit(ctx, method)
}

// UnaryServerInterceptor decides each unary call before its handler runs,
// keeping Limit's status codes as they are.
func (l *Limiter) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		setHeader := func(md metadata.MD) error { return grpc.SetHeader(ctx, md) }
		held, err := l.decide(ctx, info.FullMethod, setHeader, true)
		if err != nil {
			return nil, err
		}
		if held != nil {
			defer held.End()
		}
		return handler(ctx, req)
	}
}

// StreamServerInterceptor decides each streaming call once, when it opens
// and before its handler runs, with the same status codes as Limit: a
// stream is one request to Tollgate however many messages it carries, so
// give streams an operation of their own (FullMethod does) where that
// matters. The fields go out as the stream's header metadata.
func (l *Limiter) StreamServerInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		held, err := l.decide(ss.Context(), info.FullMethod, ss.SetHeader, true)
		if err != nil {
			return err
		}
		if held != nil {
			defer held.End()
		}
		return handler(srv, ss)
	}
}

// limit decides the call whose server context ctx is.
func (l *Limiter) limit(ctx context.Context, method string) error {
	_, err := l.decide(ctx, method, func(md metadata.MD) error { return grpc.SetHeader(ctx, md) }, false)
	return err
}

// decide asks Tollgate about one call, and hands the fields to setHeader.
// With leased and Concurrency on, the call takes a lease, which the caller
// must End when the call does.
func (l *Limiter) decide(ctx context.Context, method string, setHeader func(metadata.MD) error, leased bool) (*leasehold.Holder, error) {
	req, err := l.request(ctx, method)
	if err != nil {
		l.report(ctx, method, err)
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	req.MaxWait = l.maxWait(ctx)
	c := l.cfg.Concurrency
	if leased && c != nil {
		req.LeaseID = leasehold.ID(firstMetadata(ctx, c.RequestIDMetadata))
		req.LeaseTTL = c.ttl()
	}
	d, err := l.decider.Decide(ctx, req)
	if err != nil {
		return nil, l.refuse(ctx, method, err)
	}
	if d.Unreachable != nil {
		l.report(ctx, method, d.Unreachable)
	}
	ds := []tollgate.Decision{d}
	md := fieldsMetadata(ds, l.cfg.LegacyHeaders)
	if d.Allowed && d.Delay > 0 {
		md.Set("ratelimit-delay", strconv.FormatFloat(d.Delay.Seconds(), 'f', 3, 64))
	}
	// Header metadata is best effort: it fails only when headers were
	// already sent, which cannot be before the handler runs.
	_ = setHeader(md)
	if !d.Allowed {
		return nil, denial(ds, c != nil && c.Unavailable && d.LeaseDenied())
	}
	var held *leasehold.Holder
	if targets := leasehold.Held([]tollgate.Request{req}, ds); len(targets) > 0 {
		held = leasehold.Hold(ctx, l.leaser, targets, c.ttl(), func(err error) { l.report(ctx, method, err) })
	}
	if err := waitOut(ctx, d.Delay); err != nil {
		if held != nil {
			held.End()
		}
		return nil, err
	}
	return held, nil
}

func (c *Concurrency) ttl() time.Duration {
	if c.TTL > 0 {
		return c.TTL
	}
	return leasehold.DefaultTTL
}

// firstMetadata is the first value of the named request metadata, or "".
func firstMetadata(ctx context.Context, name string) string {
	if name == "" {
		return ""
	}
	if v := metadata.ValueFromIncomingContext(ctx, name); len(v) > 0 {
		return v[0]
	}
	return ""
}

// maxWait is the MaxWait to ask with: the configured one, cut to what is
// left before the call's deadline, if it has one.
func (l *Limiter) maxWait(ctx context.Context) time.Duration {
	wait := l.cfg.MaxWait
	if deadline, ok := ctx.Deadline(); ok && wait > 0 {
		wait = min(wait, time.Until(deadline))
	}
	return max(wait, 0)
}

// waitOut holds an allowed call for its delay (shaping); it returns the
// context's status if the call ends first.
func waitOut(ctx context.Context, delay time.Duration) error {
	if delay <= 0 {
		return nil
	}
	timer := time.NewTimer(delay)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	}
}

func (l *Limiter) request(ctx context.Context, method string) (tollgate.Request, error) {
	var req tollgate.Request
	var err error
	if req.Scope, err = l.cfg.Scope(ctx, method); err != nil {
		return req, fmt.Errorf("scope: %w", err)
	}
	if l.cfg.Identity != nil {
		if req.Identity, err = l.cfg.Identity(ctx, method); err != nil {
			return req, fmt.Errorf("identity: %w", err)
		}
	}
	if l.cfg.Operation != nil {
		if req.Operation, err = l.cfg.Operation(ctx, method); err != nil {
			return req, fmt.Errorf("operation: %w", err)
		}
	}
	if l.cfg.Cost != nil {
		req.Cost = l.cfg.Cost(ctx, method)
	}
	if l.cfg.Attributes != nil {
		req.Attributes = l.cfg.Attributes(ctx, method)
	}
	return req, nil
}

func (l *Limiter) refuse(ctx context.Context, method string, err error) error {
	if ctx.Err() != nil {
		return status.FromContextError(ctx.Err()).Err()
	}
	l.report(ctx, method, err)
	var invalid *tollgate.InvalidRequestError
	var unavailable *tollgate.UnavailableError
	switch {
	case errors.As(err, &invalid):
		return status.Error(codes.InvalidArgument, invalid.Message)
	case errors.As(err, &unavailable):
		return status.Error(codes.Unavailable, "rate limiter unavailable, and this service fails closed")
	default:
		return status.Error(codes.Internal, err.Error())
	}
}

func (l *Limiter) report(ctx context.Context, method string, err error) {
	if l.cfg.OnError != nil {
		l.cfg.OnError(ctx, method, err)
	}
}

// fieldsMetadata is the draft-11 fields as response header metadata.
func fieldsMetadata(ds []tollgate.Decision, legacy bool) metadata.MD {
	md := metadata.MD{}
	for _, f := range fields.Headers(ds, legacy) {
		md.Set(f.Name, f.Value)
	}
	return md
}

// denial is the RESOURCE_EXHAUSTED status of a denied call (UNAVAILABLE,
// with the same details, for a full backend pool).
func denial(ds []tollgate.Decision, unavailable bool) error {
	violated := fields.ViolatedPolicies(ds)
	msg := "rate limited"
	if len(violated) > 0 {
		msg += " by " + strings.Join(violated, ", ")
	}
	wait, retryable := fields.RetryAfter(ds)
	if retryable {
		msg += "; retry in " + strconv.FormatInt(fields.CeilSeconds(wait), 10) + "s"
	} else if reasons := fields.Reasons(ds); len(reasons) > 0 {
		msg += ": " + strings.Join(reasons, "; ")
	}
	code := codes.ResourceExhausted
	if unavailable {
		code = codes.Unavailable
	}
	st := status.New(code, msg)
	quota := &errdetails.QuotaFailure{}
	for _, rule := range violated {
		quota.Violations = append(quota.Violations, &errdetails.QuotaFailure_Violation{
			Subject:     rule,
			Description: "the Tollgate rule " + strconv.Quote(rule) + " has too few tokens for this call",
		})
	}
	details := []protoadapt.MessageV1{quota}
	if retryable {
		details = append(details, &errdetails.RetryInfo{RetryDelay: durationpb.New(wait)})
	}
	if withDetails, err := st.WithDetails(details...); err == nil {
		st = withDetails
	}
	return st.Err()
}
