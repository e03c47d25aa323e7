// Package httplimit is net/http middleware that asks Tollgate about each
// request, in the func(http.Handler) http.Handler shape.
//
// On allow, the request passes on with draft-11 RateLimit-Policy and
// RateLimit headers added to the response. On deny, the middleware answers
// 429 with Retry-After (whole seconds, rounded up), the same headers, and an
// application/problem+json body of type quota-exceeded listing the
// violated-policies; or, for an MCP call, a JSON-RPC error. When Tollgate
// cannot answer, the client's failure mode applies: fail-open passes the
// request on, fail-closed answers 503. With Config.MCP, the JSON-RPC calls
// of a body are charged one by one, by the rules of package mcp.
//
//	client, err := tollgate.NewClient("127.0.0.1:50051")
//	...
//	limit, err := httplimit.New(client, httplimit.Config{
//		Scope:    httplimit.Static("demo"),
//		Identity: httplimit.Header("X-User"),
//	})
//	...
//	http.ListenAndServe(":8080", limit(upstream))
package httplimit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/internal/fields"
	"github.com/tollgate-rs/tollgate/clients/go/internal/leasehold"
	"github.com/tollgate-rs/tollgate/clients/go/mcp"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

// DefaultMaxBodyBytes is the most of an MCP request body read when
// Config.MaxBodyBytes is 0: far above any JSON-RPC call, far below what
// would hurt a proxy that holds one body per request in memory.
const DefaultMaxBodyBytes = 1 << 20

// Decider is what the middleware asks; *tollgate.Client is one. An MCP
// batch of several operations goes to DecideBatchAtomic, so it is charged
// all or nothing.
type Decider interface {
	Decide(ctx context.Context, req tollgate.Request) (tollgate.Decision, error)
	DecideBatchAtomic(ctx context.Context, reqs []tollgate.Request) ([]tollgate.Decision, error)
}

// Config says how to turn a request into a question to Tollgate.
type Config struct {
	// Scope names the rule set. Required.
	Scope Extractor
	// Identity is the caller; nil means anonymous (one shared bucket).
	Identity Extractor
	// Operation is what the caller does; nil means none. With MCP on, it
	// applies only to bodies that are not JSON-RPC calls.
	Operation Extractor
	// Cost is the tokens one request (or one MCP call) takes; nil means 1.
	Cost func(*http.Request) uint32
	// Attributes select tiered limits, such as tier=premium; nil means none.
	Attributes func(*http.Request) map[string]string

	// LegacyHeaders also sets X-RateLimit-Limit, X-RateLimit-Remaining and
	// X-RateLimit-Reset, for clients written against those headers.
	LegacyHeaders bool

	// MCP turns on MCP-aware extraction for POST requests: the body is read
	// (at most MaxBodyBytes; more is a 413), each JSON-RPC call in it is
	// charged under its own operation, a batch is decided all or nothing
	// (refused whole, and charged nothing, if any of it is denied), and the
	// body is handed on byte for byte. A body that could be read in more
	// than one way is refused with 400 and a JSON-RPC parse error, and a
	// compressed one with 415; neither is charged or forwarded.
	MCP bool
	// MCPPath, if set, limits MCP-aware extraction to POSTs to this path
	// (the MCP endpoint), compared as mcp.PathMatches does: /mcp/, //mcp
	// and /MCP are the endpoint too. Other requests are decided as plain
	// ones.
	MCPPath string
	// MaxBodyBytes caps the body read with MCP on; 0 means
	// DefaultMaxBodyBytes.
	MaxBodyBytes int64
	// MCPErrorCode is the JSON-RPC error code of a denied call; 0 means
	// mcp.RateLimitedCode (see docs/mcp.md for the choice).
	MCPErrorCode int

	// MaxWait turns on shaping: each request is sent with this MaxWait (or
	// less: what is left before its context's deadline), and a request a
	// limit with max_delay admits for later is held here for its Delay,
	// then passed on with a RateLimit-Delay header (seconds, to the
	// millisecond). A client that goes away meanwhile gets nothing
	// forwarded. Zero: allowed now or denied, as without shaping.
	MaxWait time.Duration

	// Concurrency, if set, holds a lease in the scope's concurrency limit
	// for the lifetime of each request: see Concurrency. The Decider must
	// be a Leaser too (*tollgate.Client is).
	Concurrency *Concurrency

	// OnError, if set, hears of every call Tollgate could not answer
	// (including those let through by fail-open) and every refusal of a
	// request as invalid, for logs and metrics. It must not write to w.
	OnError func(r *http.Request, err error)
}

// New returns the middleware. It fails only on a Config without a Scope.
func New(d Decider, cfg Config) (func(http.Handler) http.Handler, error) {
	if d == nil {
		return nil, errors.New("httplimit: no Decider")
	}
	if cfg.Scope == nil {
		return nil, errors.New("httplimit: Config.Scope is required")
	}
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = DefaultMaxBodyBytes
	}
	var leaser Leaser
	if cfg.Concurrency != nil {
		var ok bool
		if leaser, ok = d.(Leaser); !ok {
			return nil, errors.New("httplimit: Config.Concurrency needs a Decider that is also a Leaser")
		}
		if s := cfg.Concurrency.DenyStatus; s != 0 && s != http.StatusTooManyRequests && s != http.StatusServiceUnavailable {
			return nil, fmt.Errorf("httplimit: Concurrency.DenyStatus %d: want 0, 429 or 503", s)
		}
	}
	return func(next http.Handler) http.Handler {
		return &handler{decider: d, leaser: leaser, cfg: cfg, next: next}
	}, nil
}

type handler struct {
	decider Decider
	// leaser is the decider as a Leaser, when Concurrency is on.
	leaser Leaser
	cfg    Config
	next   http.Handler
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	base, err := h.request(r)
	base.MaxWait = h.maxWait(r)
	if err != nil {
		h.report(r, err)
		writePlainProblem(w, http.StatusBadRequest, "Bad request", err.Error())
		return
	}

	rpc := mcp.Body{}
	if h.cfg.MCP && r.Method == http.MethodPost && (h.cfg.MCPPath == "" || mcp.PathMatches(h.cfg.MCPPath, r.URL.Path)) {
		if enc := contentEncoding(r.Header); enc != "" {
			// Refused rather than decoded: see docs/mcp.md.
			w.Header().Set("Accept-Encoding", "identity")
			writePlainProblem(w, http.StatusUnsupportedMediaType, "Compressed MCP body",
				"an MCP request body is read as sent, so it may not have Content-Encoding "+strconv.Quote(enc))
			return
		}
		body, status, err := readBody(r, h.cfg.MaxBodyBytes)
		if err != nil {
			writePlainProblem(w, status, http.StatusText(status), err.Error())
			return
		}
		var refused *mcp.ParseError
		if rpc, err = mcp.Parse(body); errors.As(err, &refused) {
			h.report(r, err)
			writeJSON(w, http.StatusBadRequest, "application/json", refused.Body())
			return
		}
		if rpc.JSONRPC && len(rpc.Calls) == 0 {
			// Only notifications and responses: never charged.
			h.next.ServeHTTP(w, r)
			return
		}
	}

	var ds []tollgate.Decision
	var reqs []tollgate.Request
	if rpc.JSONRPC {
		reqs = h.leased(r, rpc.Requests(base), true)
		if len(reqs) == 1 {
			var d tollgate.Decision
			d, err = h.decider.Decide(r.Context(), reqs[0])
			ds = []tollgate.Decision{d}
		} else {
			// Atomic: a refused batch takes nothing, not even from the
			// operations that had room.
			ds, err = h.decider.DecideBatchAtomic(r.Context(), reqs)
		}
	} else {
		reqs = h.leased(r, []tollgate.Request{base}, false)
		var d tollgate.Decision
		d, err = h.decider.Decide(r.Context(), reqs[0])
		ds = []tollgate.Decision{d}
	}
	if err != nil {
		h.refuse(w, r, err)
		return
	}
	if targets := leasehold.Held(reqs, ds); len(targets) > 0 {
		leases := leasehold.Hold(r.Context(), h.leaser, targets, h.cfg.Concurrency.ttl(), func(err error) { h.report(r, err) })
		defer leases.End()
	}
	for i := range ds {
		if ds[i].Unreachable != nil {
			h.report(r, ds[i].Unreachable)
			break
		}
	}

	if fields.Denied(ds) {
		status := http.StatusTooManyRequests
		if h.cfg.Concurrency != nil && h.cfg.Concurrency.DenyStatus != 0 && leaseDenied(ds) {
			status = h.cfg.Concurrency.DenyStatus
		}
		if rpc.JSONRPC {
			writeRPCDenial(w, rpc, ds, h.cfg.MCPErrorCode, h.cfg.LegacyHeaders, status)
		} else {
			writeQuotaExceeded(w, ds, h.cfg.LegacyHeaders, status)
		}
		return
	}
	setFields(w.Header(), ds, h.cfg.LegacyHeaders)
	if !h.waitOut(w, r, ds) {
		return
	}
	h.next.ServeHTTP(w, r)
}

// maxWait is the MaxWait to send for r: the configured one, cut to what is
// left before r's deadline, if it has one.
func (h *handler) maxWait(r *http.Request) time.Duration {
	wait := h.cfg.MaxWait
	if deadline, ok := r.Context().Deadline(); ok && wait > 0 {
		wait = min(wait, time.Until(deadline))
	}
	return max(wait, 0)
}

// waitOut holds an allowed request for the longest Delay of its decisions
// (shaping), saying so in a RateLimit-Delay header. It reports false, having
// answered, when the client went away first.
func (h *handler) waitOut(w http.ResponseWriter, r *http.Request, ds []tollgate.Decision) bool {
	var delay time.Duration
	for i := range ds {
		delay = max(delay, ds[i].Delay)
	}
	if delay <= 0 {
		return true
	}
	w.Header().Set("RateLimit-Delay", strconv.FormatFloat(delay.Seconds(), 'f', 3, 64))
	timer := time.NewTimer(delay)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-r.Context().Done():
		// The client went away; nobody reads this answer.
		w.WriteHeader(http.StatusServiceUnavailable)
		return false
	}
}

// request builds the question for r, before any MCP calls are read.
func (h *handler) request(r *http.Request) (tollgate.Request, error) {
	var req tollgate.Request
	var err error
	if req.Scope, err = h.cfg.Scope(r); err != nil {
		return req, fmt.Errorf("scope: %w", err)
	}
	if h.cfg.Identity != nil {
		if req.Identity, err = h.cfg.Identity(r); err != nil {
			return req, fmt.Errorf("identity: %w", err)
		}
	}
	if h.cfg.Operation != nil {
		if req.Operation, err = h.cfg.Operation(r); err != nil {
			return req, fmt.Errorf("operation: %w", err)
		}
	}
	if h.cfg.Cost != nil {
		req.Cost = h.cfg.Cost(r)
	}
	if h.cfg.Attributes != nil {
		req.Attributes = h.cfg.Attributes(r)
	}
	return req, nil
}

// refuse answers a request Tollgate did not decide.
func (h *handler) refuse(w http.ResponseWriter, r *http.Request, err error) {
	var invalid *tollgate.InvalidRequestError
	var unavailable *tollgate.UnavailableError
	switch {
	case r.Context().Err() != nil:
		// The client went away; nobody reads this answer.
		w.WriteHeader(http.StatusServiceUnavailable)
	case errors.As(err, &invalid):
		h.report(r, err)
		writePlainProblem(w, http.StatusBadRequest, "Bad request", invalid.Message)
	case errors.As(err, &unavailable):
		h.report(r, err)
		writePlainProblem(w, http.StatusServiceUnavailable, "Rate limiter unavailable",
			"The rate limiter could not be reached, and this service fails closed.")
	default:
		h.report(r, err)
		writePlainProblem(w, http.StatusInternalServerError, "Rate limiter refused the call", err.Error())
	}
}

func (h *handler) report(r *http.Request, err error) {
	if h.cfg.OnError != nil {
		h.cfg.OnError(r, err)
	}
}

// readBody reads at most limit bytes of r's body and puts them back, so the
// next handler reads exactly what the client sent. It answers the status to
// refuse with on failure: 413 past the limit, 400 on a broken body.
func readBody(r *http.Request, limit int64) ([]byte, int, error) {
	if r.Body == nil || r.Body == http.NoBody {
		return nil, 0, nil
	}
	if r.ContentLength > limit {
		return nil, http.StatusRequestEntityTooLarge, fmt.Errorf("the body is %d bytes; the most accepted is %d", r.ContentLength, limit)
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	_ = r.Body.Close()
	if err != nil {
		return nil, http.StatusBadRequest, fmt.Errorf("reading the body: %w", err)
	}
	if int64(len(body)) > limit {
		return nil, http.StatusRequestEntityTooLarge, fmt.Errorf("the body is over %d bytes, the most accepted", limit)
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	r.ContentLength = int64(len(body))
	// The length is known now, so a chunked upload goes on with a
	// Content-Length: the same bytes, framed differently.
	r.TransferEncoding = nil
	return body, 0, nil
}

// contentEncoding is the body's Content-Encoding, or "" when it lists no
// coding but identity.
func contentEncoding(h http.Header) string {
	values := h.Values("Content-Encoding")
	for _, v := range values {
		for _, coding := range strings.Split(v, ",") {
			if coding = strings.TrimSpace(coding); coding != "" && !strings.EqualFold(coding, "identity") {
				return strings.Join(values, ", ")
			}
		}
	}
	return ""
}
