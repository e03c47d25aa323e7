// Package tollgate is the Go client of Tollgate, a rate-limit decision
// service: it asks "may this caller do this now?" over gRPC
// (tollgate.v1.RateLimiter) and turns the answer into a [Decision].
//
// The module's map:
//
//	tollgate      this package: Client (one reused connection, a deadline on
//	              every call, plain and atomic batches, a local failure
//	              policy)
//	httplimit     net/http middleware: extractors, 429s, MCP JSON-RPC bodies
//	grpclimit     grpc-go unary and stream interceptors, and a Limit(ctx)
//	              error limiter that fits go-grpc-middleware v2's
//	              ratelimit.Limiter
//	mcp           MCP-aware extraction: the JSON-RPC calls of a body, and
//	              the JSON-RPC error of a denial
//	internal/fields  the draft-11 RateLimit fields of a decision, for
//	              httplimit and grpclimit (checked against the Rust crate's
//	              vectors)
//	gen/tollgate/v1  generated stubs (scripts/gen.sh; never edited by hand)
//	examples/proxy   a reverse proxy built on httplimit
//
// A call to Tollgate has three outcomes, and they never blur:
//
//   - Tollgate answered: Decide returns its Decision (allowed or denied) and
//     a nil error.
//   - Tollgate could not answer (unreachable, slower than the deadline,
//     UNAVAILABLE, or its store down in a scope that fails closed): the
//     client's [FailureMode] decides. [FailOpen] returns an allowed Decision
//     marked Degraded, with the cause in Decision.Unreachable; [FailClosed]
//     returns an [*UnavailableError].
//   - The request was refused as malformed, or the client is not allowed to
//     ask: an [*InvalidRequestError] or a [*RefusedError], whatever the
//     failure mode, because absorbing a misconfiguration would hide it.
//
// For a call whose real cost is known only afterwards (an LLM's tokens),
// [Request].SettleWithin makes Cost an estimate: the allowed Decision
// carries a Reservation, and [Client.Settle] applies the real cost. A settle
// is never made up locally: when Tollgate cannot answer it is an
// [*UnavailableError] whatever the failure mode, and settling again is safe.
// [Request].Priority sheds background work before interactive users against
// limits with headroom.
package tollgate
