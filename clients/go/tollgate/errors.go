package tollgate

import (
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
)

// Why Tollgate refused a [Client.Settle], for errors.Is. Each refusal
// changes nothing. The error returned wraps one of them and carries
// Tollgate's message.
var (
	// ErrInvalidReservation: the token is not a reservation Tollgate signed,
	// or it was altered, or another deployment's key signed it.
	ErrInvalidReservation = errors.New("invalid reservation")
	// ErrAlreadySettled: the reservation was settled before, on this
	// replica or another. After a Settle that ended in an
	// [*UnavailableError] (a lost answer), it means the first try landed.
	ErrAlreadySettled = errors.New("reservation already settled")
	// ErrReservationExpired: the reservation's SettleWithin ran out, so its
	// estimate stands as the cost.
	ErrReservationExpired = errors.New("reservation expired")
)

// settleRefusal is a refused settle: errors.Is finds kind, one of the
// sentinels above; the message is Tollgate's.
type settleRefusal struct {
	kind    error
	message string
}

func (e *settleRefusal) Error() string {
	return "tollgate refused the settle: " + e.message
}

func (e *settleRefusal) Unwrap() error { return e.kind }

// UnavailableError is returned, under [FailClosed], when Tollgate could not
// answer: unreachable, slower than the client's deadline, or an UNAVAILABLE
// status (such as its store being down in a scope that fails closed). A
// caller should answer 503, not 429: nobody was rate limited.
type UnavailableError struct {
	// Cause is what went wrong: a gRPC status error, a deadline, or, when
	// the client skipped the call because the calls before it failed, an
	// error saying so that wraps the last failure.
	Cause error
}

func (e *UnavailableError) Error() string {
	return "tollgate unavailable: " + e.Cause.Error()
}

func (e *UnavailableError) Unwrap() error { return e.Cause }

// InvalidRequestError is Tollgate's INVALID_ARGUMENT: a field was too long,
// held control characters, or a batch was too large. Nothing was taken. The
// message starts with the field's path, such as `identity: is 300 bytes`.
// It is never subject to the failure mode: input a caller controls must not
// be a way around the limit.
type InvalidRequestError struct {
	Message string
}

func (e *InvalidRequestError) Error() string {
	return "tollgate refused the request as invalid: " + e.Message
}

// RefusedError is any other refusal by Tollgate that says this client is
// misconfigured rather than that Tollgate is down: PERMISSION_DENIED,
// UNAUTHENTICATED, UNIMPLEMENTED (not a Tollgate), and the like. Like
// [InvalidRequestError] it is returned whatever the failure mode.
type RefusedError struct {
	Code    codes.Code
	Message string
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("tollgate refused the call: %s: %s", e.Code, e.Message)
}

// circuitOpenError is the cause given when the client skipped a call
// because recent calls failed; see WithCircuitBreaker.
type circuitOpenError struct {
	failures int
	last     error
}

func (e *circuitOpenError) Error() string {
	return fmt.Sprintf("not called: %d calls in a row failed, the last with: %v", e.failures, e.last)
}

func (e *circuitOpenError) Unwrap() error { return e.last }
