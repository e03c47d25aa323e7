package tollgate

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	tollgatev1 "github.com/tollgate-rs/tollgate/clients/go/gen/tollgate/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// FailureMode is what the client answers when Tollgate cannot.
type FailureMode int

const (
	// FailOpen allows the request, marks the Decision Degraded and puts the
	// cause in Decision.Unreachable. It is the default, as on the server:
	// an outage of the limiter should not become an outage of the service.
	FailOpen FailureMode = iota
	// FailClosed returns an [*UnavailableError]; a middleware answers 503.
	FailClosed
)

func (m FailureMode) String() string {
	switch m {
	case FailOpen:
		return "open"
	case FailClosed:
		return "closed"
	default:
		return fmt.Sprintf("FailureMode(%d)", int(m))
	}
}

// ParseFailureMode reads "open" or "closed", as in Tollgate's own config.
func ParseFailureMode(s string) (FailureMode, error) {
	switch s {
	case "open":
		return FailOpen, nil
	case "closed":
		return FailClosed, nil
	default:
		return 0, fmt.Errorf("failure mode %q: want open or closed", s)
	}
}

// Defaults, named so the README and the code agree.
const (
	// DefaultDeadline bounds every call. Tollgate answers from memory in
	// well under a millisecond and from Redis in a few; 50ms leaves room for
	// a busy network without letting a stuck Tollgate stall the caller. The
	// Rust client has the same default.
	DefaultDeadline = 50 * time.Millisecond
	// DefaultBreakerFailures is how many calls in a row must fail before the
	// client stops calling for DefaultBreakerCooldown.
	DefaultBreakerFailures = 3
	// DefaultBreakerCooldown is how long the client answers by its failure
	// mode without calling, after DefaultBreakerFailures failures; then one
	// call probes.
	DefaultBreakerCooldown = 500 * time.Millisecond
	// MaxBatch is the most requests one ShouldAllowBatch may carry.
	MaxBatch = 256
)

// Option configures a [Client].
type Option func(*config)

type config struct {
	deadline        time.Duration
	failureMode     FailureMode
	breakerFailures int
	breakerCooldown time.Duration
	dialOptions     []grpc.DialOption
}

// WithDeadline sets how long each call may take (DefaultDeadline if
// unset). A shorter deadline already on the caller's context wins.
func WithDeadline(d time.Duration) Option {
	return func(c *config) { c.deadline = d }
}

// WithFailureMode sets what the client answers when Tollgate cannot.
func WithFailureMode(m FailureMode) Option {
	return func(c *config) { c.failureMode = m }
}

// WithCircuitBreaker makes the client stop calling Tollgate for cooldown
// after failures calls in a row failed, answering by its failure mode at
// once; then one call probes, and a success closes the breaker. Without it
// a Tollgate that hangs (rather than refuses connections) would cost every
// request the full deadline. failures <= 0 turns the breaker off.
func WithCircuitBreaker(failures int, cooldown time.Duration) Option {
	return func(c *config) {
		c.breakerFailures = failures
		c.breakerCooldown = cooldown
	}
}

// WithDialOptions adds grpc.DialOptions, such as transport credentials for
// TLS. Without them, NewClient connects in plaintext.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(c *config) { c.dialOptions = append(c.dialOptions, opts...) }
}

// Client asks Tollgate for decisions over one long-lived gRPC connection,
// which grpc-go multiplexes and reconnects. It is safe for concurrent use;
// make one per process and share it.
type Client struct {
	rpc tollgatev1.RateLimiterClient
	// leases serves AcquireLease, RenewLease and ReleaseLease, on the same
	// connection.
	leases tollgatev1.LeasesClient
	// conn is closed by Close; nil when the caller owns the connection.
	conn *grpc.ClientConn
	// deadline bounds every call, so a slow Tollgate costs at most this.
	deadline time.Duration
	// failure decides what an unanswered call returns.
	failure FailureMode
	// breaker skips calls while Tollgate keeps failing; nil when off.
	breaker *breaker
}

// NewClient makes a client for the Tollgate at target (host:port, or any
// grpc-go target), on a connection of its own that [Client.Close] closes.
// As with grpc.NewClient, no connection is made yet: it is made on the first
// call and kept, so a proxy can start before Tollgate is up.
func NewClient(target string, opts ...Option) (*Client, error) {
	cfg := newConfig(opts)
	dialOpts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// grpc-go's default reconnect backoff grows to two minutes; a
		// limiter that restarted should be used again within seconds.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay:  100 * time.Millisecond,
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   2 * time.Second,
			},
			MinConnectTimeout: time.Second,
		}),
	}
	dialOpts = append(dialOpts, cfg.dialOptions...)
	conn, err := grpc.NewClient(target, dialOpts...)
	if err != nil {
		return nil, fmt.Errorf("tollgate: dial %s: %w", target, err)
	}
	c := newClient(conn, cfg)
	c.conn = conn
	return c, nil
}

// NewClientFromConn makes a client on a connection the caller owns (Close
// leaves it open), for callers that share one connection or build it
// themselves. [WithDialOptions] has no effect here.
func NewClientFromConn(conn grpc.ClientConnInterface, opts ...Option) *Client {
	return newClient(conn, newConfig(opts))
}

// Dial is [NewClient] under its old name.
//
// Deprecated: use [NewClient], which is what grpc-go's names lead one to
// expect; Dial goes in the next release. (NewClient itself used to take a
// connection: that is [NewClientFromConn] now.)
func Dial(target string, opts ...Option) (*Client, error) {
	return NewClient(target, opts...)
}

func newConfig(opts []Option) config {
	cfg := config{
		deadline:        DefaultDeadline,
		failureMode:     FailOpen,
		breakerFailures: DefaultBreakerFailures,
		breakerCooldown: DefaultBreakerCooldown,
	}
	for _, o := range opts {
		o(&cfg)
	}
	return cfg
}

func newClient(conn grpc.ClientConnInterface, cfg config) *Client {
	c := &Client{
		rpc:      tollgatev1.NewRateLimiterClient(conn),
		leases:   tollgatev1.NewLeasesClient(conn),
		deadline: cfg.deadline,
		failure:  cfg.failureMode,
	}
	if cfg.breakerFailures > 0 {
		c.breaker = &breaker{threshold: cfg.breakerFailures, cooldown: cfg.breakerCooldown}
	}
	return c
}

// Close closes the connection NewClient made; on a client from
// NewClientFromConn it does nothing.
func (c *Client) Close() error {
	if c.conn == nil {
		return nil
	}
	return c.conn.Close()
}

// FailureMode reports the client's failure mode.
func (c *Client) FailureMode() FailureMode { return c.failure }

// Decide asks Tollgate about one request. See the package documentation for
// what each outcome returns.
func (c *Client) Decide(ctx context.Context, req Request) (Decision, error) {
	var resp *tollgatev1.ShouldAllowResponse
	err := c.call(ctx, func(ctx context.Context) error {
		var err error
		resp, err = c.rpc.ShouldAllow(ctx, req.proto())
		return err
	})
	if err != nil {
		return c.failed(err)
	}
	return decisionFromProto(resp), nil
}

// DecideBatch asks about up to [MaxBatch] independent requests in one call
// and one store round trip. Each is decided on its own, in order, exactly as
// Decide would decide it; the decisions come back in request order. It is
// not all-or-nothing: an allowed entry keeps its tokens when another entry
// is denied (for that, see [Client.DecideBatchAtomic]). On failure the
// failure mode applies to every entry alike.
func (c *Client) DecideBatch(ctx context.Context, reqs []Request) ([]Decision, error) {
	return c.decideBatch(ctx, reqs, false)
}

// DecideBatchAtomic asks about up to [MaxBatch] requests as one atomic
// charge: every one is allowed, or none is and none takes anything. A bucket
// that several requests draw on must hold their summed cost. When denied,
// every decision is denied; those whose own buckets ran out carry RetryAfter
// (or a Reason), and the others report [Decision.DeniedByBatch]. The batch
// may pass once the longest RetryAfter has gone by. On failure the failure
// mode applies to every entry alike.
func (c *Client) DecideBatchAtomic(ctx context.Context, reqs []Request) ([]Decision, error) {
	return c.decideBatch(ctx, reqs, true)
}

func (c *Client) decideBatch(ctx context.Context, reqs []Request, atomic bool) ([]Decision, error) {
	if len(reqs) == 0 {
		return nil, nil
	}
	in := &tollgatev1.ShouldAllowBatchRequest{
		Requests: make([]*tollgatev1.ShouldAllowRequest, len(reqs)),
		Atomic:   atomic,
	}
	for i := range reqs {
		in.Requests[i] = reqs[i].proto()
	}
	var resp *tollgatev1.ShouldAllowBatchResponse
	err := c.call(ctx, func(ctx context.Context) error {
		var err error
		resp, err = c.rpc.ShouldAllowBatch(ctx, in)
		return err
	})
	if err == nil && len(resp.GetResponses()) != len(reqs) {
		err = &RefusedError{Code: codes.Internal, Message: fmt.Sprintf("asked %d questions, got %d answers", len(reqs), len(resp.GetResponses()))}
	}
	out := make([]Decision, len(reqs))
	if err != nil {
		d, err := c.failed(err)
		if err != nil {
			return nil, err
		}
		for i := range out {
			out[i] = d
		}
		return out, nil
	}
	for i, r := range resp.GetResponses() {
		out[i] = decisionFromProto(r)
	}
	return out, nil
}

// Settle settles a reservation: it applies the real cost of a request that
// was allowed with [Request].SettleWithin (its Cost was an estimate) to every
// bucket it charged, atomically. Below the estimate the difference goes back
// (never more than the reservation still holds back); above it the extra is
// taken, into debt if need be, so later requests wait until refill pays it.
//
// The call has the client's deadline (or the context's, if shorter) and the
// breaker applies, but the failure mode does not: when Tollgate cannot
// answer, Settle returns an [*UnavailableError] whatever the mode, since a
// settle made up locally would drop the refund or the debt. Settling again
// is safe, as a reservation settles once, until its SettleWithin runs out.
//
// A refusal wraps [ErrInvalidReservation], [ErrAlreadySettled] or
// [ErrReservationExpired]; test it with errors.Is.
func (c *Client) Settle(ctx context.Context, reservation string, actualCost uint32) (Settlement, error) {
	var resp *tollgatev1.SettleResponse
	err := c.call(ctx, func(ctx context.Context) error {
		var err error
		resp, err = c.rpc.Settle(ctx, &tollgatev1.SettleRequest{
			Reservation: reservation,
			ActualCost:  uint64(actualCost),
		})
		return err
	})
	if err != nil {
		return Settlement{}, settleError(err)
	}
	return settlementFromProto(resp), nil
}

// settleError names Tollgate's refusals of a settle with the sentinels;
// other errors pass as they are.
func settleError(err error) error {
	var invalid *InvalidRequestError
	if errors.As(err, &invalid) && strings.HasPrefix(invalid.Message, "reservation") {
		return &settleRefusal{kind: ErrInvalidReservation, message: invalid.Message}
	}
	var refused *RefusedError
	if errors.As(err, &refused) && refused.Code == codes.FailedPrecondition {
		switch {
		case strings.Contains(refused.Message, "already settled"):
			return &settleRefusal{kind: ErrAlreadySettled, message: refused.Message}
		case strings.Contains(refused.Message, "expired"):
			return &settleRefusal{kind: ErrReservationExpired, message: refused.Message}
		}
	}
	return err
}

// call runs one RPC under the client's deadline and breaker, and sorts its
// error into the three outcomes.
func (c *Client) call(ctx context.Context, rpc func(context.Context) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if c.breaker != nil {
		if err := c.breaker.allow(time.Now()); err != nil {
			return &UnavailableError{Cause: err}
		}
	}
	callCtx, cancel := context.WithTimeout(ctx, c.deadline)
	err := rpc(callCtx)
	cancel()
	if err == nil {
		if c.breaker != nil {
			c.breaker.success()
		}
		return nil
	}
	// The caller gave up (its client went away): not Tollgate's failure, so
	// neither the failure mode nor the breaker hears of it.
	if ctx.Err() != nil {
		return ctx.Err()
	}
	classified := classify(err)
	var unavailable *UnavailableError
	if c.breaker != nil && errors.As(classified, &unavailable) {
		c.breaker.failure(time.Now(), err)
	} else if c.breaker != nil {
		// Tollgate answered, if only to refuse: it is up.
		c.breaker.success()
	}
	return classified
}

// classify maps a gRPC error onto UnavailableError (the failure mode
// applies), InvalidRequestError or RefusedError (returned as they are).
func classify(err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return &UnavailableError{Cause: err}
	}
	switch st.Code() {
	case codes.InvalidArgument:
		return &InvalidRequestError{Message: st.Message()}
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled, codes.ResourceExhausted,
		codes.Aborted, codes.Internal, codes.Unknown, codes.DataLoss:
		return &UnavailableError{Cause: err}
	default:
		return &RefusedError{Code: st.Code(), Message: st.Message()}
	}
}

// failed applies the failure mode to an UnavailableError; other errors pass.
func (c *Client) failed(err error) (Decision, error) {
	var unavailable *UnavailableError
	if !errors.As(err, &unavailable) || c.failure == FailClosed {
		return Decision{}, err
	}
	return Decision{Allowed: true, Degraded: true, Unreachable: unavailable.Cause}, nil
}
