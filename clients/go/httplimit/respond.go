package httplimit

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"

	"github.com/tollgate-rs/tollgate/clients/go/internal/fields"
	"github.com/tollgate-rs/tollgate/clients/go/mcp"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

// QuotaExceededType is the problem type of draft-ietf-httpapi-ratelimit-
// headers-11 section 5.1, with its "violated-policies" extension member.
const QuotaExceededType = "https://iana.org/assignments/http-problem-types#quota-exceeded"

// AbnormalUsageType is the problem type of draft-ietf-httpapi-ratelimit-
// headers-11 section 5.3, for a client Tollgate's penalty box has banned.
const AbnormalUsageType = "https://iana.org/assignments/http-problem-types#abnormal-usage-detected"

// RateLimitedCode is the JSON-RPC error code of a rate-limited call.
//
// Deprecated: use [mcp.RateLimitedCode]; this alias goes in the next
// release.
const RateLimitedCode = mcp.RateLimitedCode

// Operation is the Tollgate operation of an MCP call.
//
// Deprecated: use [mcp.Operation]; this alias goes in the next release.
func Operation(method string, params json.RawMessage) string {
	return mcp.Operation(method, params)
}

// setFields adds the rate-limit headers of ds to h.
func setFields(h http.Header, ds []tollgate.Decision, legacy bool) {
	for _, f := range fields.Headers(ds, legacy) {
		h.Set(f.Name, f.Value)
	}
}

// problem is an RFC 9457 problem document.
type problem struct {
	Type             string   `json:"type"`
	Title            string   `json:"title"`
	Status           int      `json:"status"`
	Detail           string   `json:"detail,omitempty"`
	ViolatedPolicies []string `json:"violated-policies,omitempty"`
}

func writeJSON(w http.ResponseWriter, status int, contentType string, body []byte) {
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func writeProblem(w http.ResponseWriter, p problem) {
	body, _ := json.Marshal(p) // plain strings and ints: cannot fail
	writeJSON(w, p.Status, "application/problem+json", body)
}

// writeQuotaExceeded answers a denial that is not an MCP call: 429 with the
// rate-limit headers and a quota-exceeded problem document (status is 503
// instead for a full pool that Concurrency.DenyStatus says protects a
// backend).
func writeQuotaExceeded(w http.ResponseWriter, ds []tollgate.Decision, legacy bool, status int) {
	setFields(w.Header(), ds, legacy)
	p := problem{
		Type:             QuotaExceededType,
		Title:            "Quota exceeded",
		Status:           status,
		ViolatedPolicies: fields.ViolatedPolicies(ds),
	}
	if p.ViolatedPolicies == nil {
		p.ViolatedPolicies = []string{}
	}
	for _, d := range ds {
		if !d.Allowed && d.Banned {
			p.Type, p.Title = AbnormalUsageType, "Abnormal usage detected"
		}
	}
	if wait, ok := fields.RetryAfter(ds); ok {
		p.Detail = "Retry in " + strconv.FormatInt(fields.CeilSeconds(wait), 10) + " s."
	} else if reasons := fields.Reasons(ds); len(reasons) > 0 {
		p.Detail = strings.Join(reasons, "; ")
	} else {
		p.Detail = "This request cannot be allowed by retrying it."
	}
	writeProblem(w, p)
}

// writeRPCDenial answers a denied MCP call or batch: 429 with the
// rate-limit headers (Retry-After included) and JSON-RPC error objects.
func writeRPCDenial(w http.ResponseWriter, body mcp.Body, ds []tollgate.Decision, code int, legacy bool, status int) {
	setFields(w.Header(), ds, legacy)
	if code == 0 {
		code = mcp.RateLimitedCode
	}
	writeJSON(w, status, "application/json", body.DenialWithCode(ds, code))
}

func writePlainProblem(w http.ResponseWriter, status int, title, detail string) {
	writeProblem(w, problem{Type: "about:blank", Title: title, Status: status, Detail: detail})
}
