// Package mcp is MCP-aware extraction: on an MCP endpoint, what counts as
// one request is the JSON-RPC call, not the HTTP request. It reads a
// JSON-RPC body into the calls to charge ([Parse]), groups them into
// Tollgate requests ([Body.Requests]), and renders the JSON-RPC error of a
// denial ([Body.Denial]); it does no I/O. httplimit uses it when
// Config.MCP is set; a middleware for another framework can too.
//
// The rules, the same as the Rust client's:
//
//   - A call's operation is its method; tools/call:<tool name>,
//     prompts/get:<prompt name> and resources/read:<uri> name what they touch
//     (an absent name gives "tools/call:", which "tools/call:*" still
//     matches).
//   - notifications/* and responses (no method, a result or an error) are
//     never charged. Any other method is, with or without an id, so leaving
//     the id out is no way around the limit.
//   - A body that is JSON but not JSON-RPC, and an entry of a batch that is
//     not an object or has no string method, is charged as a plain HTTP
//     request, with the middleware's own operation: the MCP server will
//     refuse it, but it still cost a request.
//   - A body that could be read in more than one way is refused, not
//     guessed at ([ParseError]): anything but one JSON text in UTF-8 without
//     a byte order mark, a duplicate key in any object, a lone surrogate
//     escape, a number out of range, nesting past [MaxDepth] (127 levels), or a key that
//     is a JSON-RPC key (jsonrpc, id, method, params, result, error), or
//     name or uri in params, in another case. A lenient server could run
//     calls that a strict reading would not charge.
package mcp

import (
	"bytes"
	"encoding/json"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/tollgate-rs/tollgate/clients/go/internal/fields"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

// RateLimitedCode is the JSON-RPC error code of a rate-limited call unless
// configured otherwise: 429, the HTTP status it mirrors. MCP's 2026-07-28
// revision reserves -32020..-32099 for codes the spec defines, and asks
// that other codes be allocated outside JSON-RPC's reserved -32768..-32000;
// 429 is outside both, so it is valid under every revision. docs/mcp.md
// gives the choice.
const RateLimitedCode = 429

// ProposedRateLimitedCode is the code MCP's open proposal SEP-3304 would
// give rate limiting. It is inside the spec's reserved range, so send it
// only once the spec defines it, or to clients that expect it.
const ProposedRateLimitedCode = -32023

// LegacyRateLimitedCode is the code earlier versions of this package sent,
// for clients written against it. It sits in the range MCP now reserves.
const LegacyRateLimitedCode = -32029

// maxOperationBytes is Tollgate's limit on an operation. A longer one (a
// long resource URI) is cut at a character boundary rather than refused:
// calls that share the first 256 bytes then share an operation bucket,
// which can over-charge but never over-admit.
const maxOperationBytes = 256

// Call is one JSON-RPC message to charge.
type Call struct {
	// ID is echoed in the error of a denial; nil when the message had none.
	ID json.RawMessage
	// Operation is what the call does, such as "tools/call:search". Plain
	// is true instead when the message is not a usable JSON-RPC request,
	// so the middleware's own operation applies.
	Operation string
	Plain     bool
}

// Body is what a POST body on an MCP endpoint asks for.
type Body struct {
	// JSONRPC is false when the body is not JSON-RPC at all: it is then
	// charged once as a plain request.
	JSONRPC bool
	// Batch is true when the body was a JSON array: a denial is an array
	// of errors too.
	Batch bool
	// Calls are the charged messages, in body order. A body of only
	// notifications and responses has none, and is not charged.
	Calls []Call
}

// Parse reads a body. A body with more than one reading is refused with a
// *[ParseError] (see the package doc); JSON that is not JSON-RPC is charged
// as a plain request (Body.JSONRPC false).
func Parse(body []byte) (Body, error) {
	if err := strict(body); err != nil {
		return Body{}, err
	}
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	switch trimmed[0] {
	case '{':
		var msg map[string]json.RawMessage
		if json.Unmarshal(body, &msg) != nil {
			return Body{}, nil
		}
		if err := checkMessage(msg); err != nil {
			return Body{}, err
		}
		out := Body{JSONRPC: true}
		if c, ok := charged(msg); ok {
			out.Calls = []Call{c}
		}
		return out, nil
	case '[':
		var msgs []json.RawMessage
		// JSON-RPC calls an empty batch invalid; charging it once keeps it
		// from being a free way to reach the server.
		if json.Unmarshal(body, &msgs) != nil || len(msgs) == 0 {
			return Body{}, nil
		}
		out := Body{JSONRPC: true, Batch: true}
		for _, raw := range msgs {
			var msg map[string]json.RawMessage
			if json.Unmarshal(raw, &msg) != nil || msg == nil {
				out.Calls = append(out.Calls, Call{Plain: true})
				continue
			}
			if err := checkMessage(msg); err != nil {
				return Body{}, err
			}
			if c, ok := charged(msg); ok {
				out.Calls = append(out.Calls, c)
			}
		}
		return out, nil
	default:
		return Body{}, nil
	}
}

// charged is the call to charge for one message; ok is false for a
// notification or a response.
func charged(msg map[string]json.RawMessage) (c Call, ok bool) {
	c.ID = msg["id"]
	rawMethod, hasMethod := msg["method"]
	if !hasMethod {
		_, isResult := msg["result"]
		_, isError := msg["error"]
		if isResult || isError {
			return Call{}, false
		}
		c.Plain = true
		return c, true
	}
	var method string
	if json.Unmarshal(rawMethod, &method) != nil {
		c.Plain = true
		return c, true
	}
	if strings.HasPrefix(method, "notifications/") {
		return Call{}, false
	}
	c.Operation = Operation(method, msg["params"])
	return c, true
}

// Operation is the Tollgate operation of an MCP call: the method, and for
// the three methods that name a tool, prompt or resource, that name after a
// colon, cut to Tollgate's 256-byte limit.
func Operation(method string, params json.RawMessage) string {
	var field string
	switch method {
	case "tools/call", "prompts/get":
		field = "name"
	case "resources/read":
		field = "uri"
	default:
		return truncate(method)
	}
	var p map[string]json.RawMessage
	var name string
	if json.Unmarshal(params, &p) == nil {
		_ = json.Unmarshal(p[field], &name)
	}
	return truncate(method + ":" + name)
}

func truncate(s string) string {
	if len(s) <= maxOperationBytes {
		return s
	}
	cut := maxOperationBytes
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut]
}

// Requests turns the calls of the body into Tollgate requests like base:
// one per distinct operation, in order of first appearance, with cost = the
// number of calls × base's cost (0 counts as 1), and base's own operation
// for plain calls. Send them in one atomic batch
// ([tollgate.Client.DecideBatchAtomic]), which sums the cost of every
// bucket they share, so grouping changes no decision; it keeps a batch of
// many calls to few operations within [tollgate.MaxBatch] entries, and the
// denial's RateLimit field to one item per rule. One request needs no
// batch: Decide is atomic already.
func (b Body) Requests(base tollgate.Request) []tollgate.Request {
	unit := base.Cost
	if unit == 0 {
		unit = 1
	}
	var reqs []tollgate.Request
	index := map[string]int{}
	for _, c := range b.Calls {
		op := c.Operation
		if c.Plain {
			op = base.Operation
		}
		if i, ok := index[op]; ok {
			reqs[i].Cost += unit
			continue
		}
		index[op] = len(reqs)
		r := base
		r.Operation = op
		r.Cost = unit
		reqs = append(reqs, r)
	}
	return reqs
}

type rpcError struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Error   rpcErrorBody    `json:"error"`
}

type rpcErrorBody struct {
	Code    int          `json:"code"`
	Message string       `json:"message"`
	Data    rpcErrorData `json:"data"`
}

type rpcErrorData struct {
	RetryAfterSeconds *int64   `json:"retryAfterSeconds,omitempty"`
	RetryAfterMs      *int64   `json:"retryAfterMs,omitempty"`
	ViolatedPolicies  []string `json:"violatedPolicies"`
	Reason            string   `json:"reason,omitempty"`
}

// Denial is the body of a 429 for the calls of b, denied as ds: one
// JSON-RPC error object, or for a batch an array of them, one per charged
// call. data carries the wait (retryAfterSeconds, rounded up as in
// Retry-After, and retryAfterMs) or, when no retry can pass, the reason;
// and the rules that denied. Its media type is application/json. The code
// is RateLimitedCode.
func (b Body) Denial(ds []tollgate.Decision) []byte {
	return b.DenialWithCode(ds, RateLimitedCode)
}

// DenialWithCode is [Body.Denial] with another JSON-RPC error code, such as
// ProposedRateLimitedCode.
func (b Body) DenialWithCode(ds []tollgate.Decision, code int) []byte {
	data := rpcErrorData{ViolatedPolicies: fields.ViolatedPolicies(ds)}
	if data.ViolatedPolicies == nil {
		data.ViolatedPolicies = []string{}
	}
	if wait, ok := fields.RetryAfter(ds); ok {
		secs := fields.CeilSeconds(wait)
		ms := int64(wait / time.Millisecond)
		data.RetryAfterSeconds, data.RetryAfterMs = &secs, &ms
	} else if reasons := fields.Reasons(ds); len(reasons) > 0 {
		data.Reason = reasons[0]
	}
	message := "Rate limit exceeded"
	if b.Batch {
		message = "Rate limit exceeded: the batch was refused whole"
	}
	errorFor := func(id json.RawMessage) rpcError {
		if id == nil {
			id = json.RawMessage("null")
		}
		return rpcError{JSONRPC: "2.0", ID: id, Error: rpcErrorBody{Code: code, Message: message, Data: data}}
	}
	var v any
	if b.Batch {
		errs := make([]rpcError, len(b.Calls))
		for i, c := range b.Calls {
			errs[i] = errorFor(c.ID)
		}
		v = errs
	} else {
		var id json.RawMessage
		if len(b.Calls) > 0 {
			id = b.Calls[0].ID
		}
		v = errorFor(id)
	}
	out, err := json.Marshal(v)
	if err != nil {
		// Only an id that is not valid JSON could fail here, and ids come
		// from a body that parsed; answer without them rather than not at all.
		out = []byte(`{"jsonrpc":"2.0","id":null,"error":{"code":` + strconv.Itoa(code) + `,"message":"Rate limit exceeded"}}`)
	}
	return out
}
