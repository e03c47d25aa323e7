package httplimit

import (
	"bytes"
	"encoding/json"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

// MCP-aware extraction: on an MCP endpoint, what counts as one request is
// the JSON-RPC call, not the HTTP request. This file reads a JSON-RPC body
// into the calls to charge and renders the JSON-RPC error of a denial; it
// does no I/O. The rules, the same as the Rust client's:
//
//   - A call's operation is its method; tools/call:<tool name>,
//     prompts/get:<prompt name> and resources/read:<uri> name what they touch
//     (an absent name gives "tools/call:", which "tools/call:*" still
//     matches).
//   - notifications/* and responses (no method, a result or an error) are
//     never charged. Any other method is, with or without an id, so leaving
//     the id out is no way around the limit.
//   - A body that is not JSON-RPC, and an entry of a batch that is not an
//     object or has no string method, is charged as a plain HTTP request,
//     with the middleware's own operation: the MCP server will refuse it,
//     but it still cost a request.

// RateLimitedCode is the JSON-RPC error code of a rate-limited call.
// JSON-RPC leaves -32000..-32099 to implementations and MCP defines none for
// this; 429 is the HTTP status it mirrors.
const RateLimitedCode = -32029

// maxOperationBytes is Tollgate's limit on an operation. A longer one (a
// long resource URI) is cut at a character boundary rather than refused:
// calls that share the first 256 bytes then share an operation bucket,
// which can over-charge but never over-admit.
const maxOperationBytes = 256

// rpcCall is one JSON-RPC message to charge.
type rpcCall struct {
	// id is echoed in the error of a denial; nil when the message had none.
	id json.RawMessage
	// operation is what the call does; plain is true when the message is
	// not a usable JSON-RPC request, so the middleware's operation applies.
	operation string
	plain     bool
}

// rpcBody is what a POST body on an MCP endpoint asks for.
type rpcBody struct {
	// jsonRPC is false when the body is not JSON-RPC at all: it is then
	// charged once as a plain request.
	jsonRPC bool
	// batch is true when the body was a JSON array: a denial is an array
	// of errors too.
	batch bool
	// calls are the charged messages, in body order.
	calls []rpcCall
}

// parseRPC reads a body. It never fails: what it cannot read is charged as
// a plain request.
func parseRPC(body []byte) rpcBody {
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	if len(trimmed) == 0 {
		return rpcBody{}
	}
	switch trimmed[0] {
	case '{':
		var msg map[string]json.RawMessage
		if json.Unmarshal(body, &msg) != nil {
			return rpcBody{}
		}
		out := rpcBody{jsonRPC: true}
		if c, ok := charged(msg); ok {
			out.calls = []rpcCall{c}
		}
		return out
	case '[':
		var msgs []json.RawMessage
		// JSON-RPC calls an empty batch invalid; charging it once keeps it
		// from being a free way to reach the server.
		if json.Unmarshal(body, &msgs) != nil || len(msgs) == 0 {
			return rpcBody{}
		}
		out := rpcBody{jsonRPC: true, batch: true}
		for _, raw := range msgs {
			var msg map[string]json.RawMessage
			if json.Unmarshal(raw, &msg) != nil || msg == nil {
				out.calls = append(out.calls, rpcCall{plain: true})
				continue
			}
			if c, ok := charged(msg); ok {
				out.calls = append(out.calls, c)
			}
		}
		return out
	default:
		return rpcBody{}
	}
}

// charged is the call to charge for one message; ok is false for a
// notification or a response.
func charged(msg map[string]json.RawMessage) (c rpcCall, ok bool) {
	c.id = msg["id"]
	rawMethod, hasMethod := msg["method"]
	if !hasMethod {
		_, isResult := msg["result"]
		_, isError := msg["error"]
		if isResult || isError {
			return rpcCall{}, false
		}
		c.plain = true
		return c, true
	}
	var method string
	if json.Unmarshal(rawMethod, &method) != nil {
		c.plain = true
		return c, true
	}
	if strings.HasPrefix(method, "notifications/") {
		return rpcCall{}, false
	}
	c.operation = Operation(method, msg["params"])
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

// group turns the calls of one body into Tollgate requests: one per
// distinct operation, in order of first appearance, with cost = the number
// of calls × the unit cost. The requests go in one atomic ShouldAllowBatch,
// which sums the cost of every bucket they share, so grouping changes no
// decision; it keeps a batch of many calls to few operations within
// MaxBatch entries, and the denial's RateLimit field to one item per rule.
func group(calls []rpcCall, base tollgate.Request) []tollgate.Request {
	unit := base.Cost
	if unit == 0 {
		unit = 1
	}
	var reqs []tollgate.Request
	index := map[string]int{}
	for _, c := range calls {
		op := c.operation
		if c.plain {
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

// rpcDenial is the body of a 429 for these calls: one JSON-RPC error
// object, or for a batch an array of them, one per charged call. data
// carries the wait (retryAfterSeconds, rounded up as in Retry-After, and
// retryAfterMs) or, when no retry can pass, the reason; and the rules that
// denied.
func rpcDenial(body rpcBody, ds []tollgate.Decision) []byte {
	data := rpcErrorData{ViolatedPolicies: tollgate.ViolatedPolicies(ds)}
	if data.ViolatedPolicies == nil {
		data.ViolatedPolicies = []string{}
	}
	if wait, ok := tollgate.RetryAfter(ds); ok {
		secs := tollgate.CeilSeconds(wait)
		ms := int64(wait / time.Millisecond)
		data.RetryAfterSeconds, data.RetryAfterMs = &secs, &ms
	} else if reasons := tollgate.Reasons(ds); len(reasons) > 0 {
		data.Reason = reasons[0]
	}
	message := "Rate limit exceeded"
	if body.batch {
		message = "Rate limit exceeded: the batch was refused whole"
	}
	errorFor := func(id json.RawMessage) rpcError {
		if id == nil {
			id = json.RawMessage("null")
		}
		return rpcError{JSONRPC: "2.0", ID: id, Error: rpcErrorBody{Code: RateLimitedCode, Message: message, Data: data}}
	}
	var v any
	if body.batch {
		errs := make([]rpcError, len(body.calls))
		for i, c := range body.calls {
			errs[i] = errorFor(c.id)
		}
		v = errs
	} else {
		var id json.RawMessage
		if len(body.calls) > 0 {
			id = body.calls[0].id
		}
		v = errorFor(id)
	}
	out, err := json.Marshal(v)
	if err != nil {
		// Only an id that is not valid JSON could fail here, and ids come
		// from a body that parsed; answer without them rather than not at all.
		out = []byte(`{"jsonrpc":"2.0","id":null,"error":{"code":-32029,"message":"Rate limit exceeded"}}`)
	}
	return out
}
