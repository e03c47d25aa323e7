// Package fields renders Tollgate decisions as rate-limit fields, for the
// module's own middleware: httplimit sends them as HTTP headers, grpclimit as
// response metadata, and mcp reads the wait and the violated rules from
// here.
//
// The rendering is the Rust client's, and the server's crate
// tollgate-headers (its middleware module) checks the same test vectors,
// clients/headers/vectors.json, as vectors_test.go here.
package fields

import (
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

// The mapping from token buckets to draft-ietf-httpapi-ratelimit-headers-11:
//
//   - RateLimit-Policy: `"<rule>";q=<capacity>;w=<seconds>`, one item per
//     rule that applied, with w the bucket's refill period (the time in
//     which it refills from empty, so q per w is its rate). A token bucket
//     has no fixed window; this is the draft's nearest reading of one, and
//     the one Tollgate renders for Envoy. w is left out when Tollgate did not
//     report the period.
//   - RateLimit: `"<rule>";r=<remaining>;t=<seconds>`. When allowed, one item
//     per rule, with t the seconds until its bucket is full again. On a
//     denial, only the rules that denied, with t the seconds until the
//     request would pass, so that Retry-After is never earlier than any t.
//   - Seconds are whole and rounded up: a client that waits that long is
//     never early.
//   - A rule is named by an RFC 9651 String: `"` and `\` are escaped with a
//     backslash, and every other byte outside visible ASCII (non-ASCII
//     UTF-8, control characters) is percent-encoded with upper-case hex, so
//     "café" is "caf%C3%A9" and a client can decode the name back. The server
//     writes names the same way.
//
// Several decisions can share one response (an MCP batch is one entry per
// distinct operation of one atomic batch), so everything here takes a slice;
// a rule seen twice is merged, keeping the smaller r and the longer t.

// Fields are the rate-limit header values for the decisions behind one
// response. An empty string means "leave this header out".
type Fields struct {
	// Policy is the RateLimit-Policy value.
	Policy string
	// RateLimit is the RateLimit value.
	RateLimit string
	// RetryAfter is the Retry-After value: set on a denial that a retry can
	// pass, in whole seconds rounded up.
	RetryAfter string
	// LegacyLimit, LegacyRemaining and LegacyReset are X-RateLimit-Limit,
	// -Remaining and -Reset (seconds until full) of the most restrictive
	// bucket, for clients written against those older de-facto headers.
	LegacyLimit, LegacyRemaining, LegacyReset string
}

// Header is one rate-limit field to send: its lower-case name and value.
type Header struct {
	Name, Value string
}

// Headers is what httplimit sends as HTTP headers and grpclimit as response
// metadata, in this order: ratelimit-policy and ratelimit when a rule
// applied, retry-after on a denial a retry can pass, and with legacy the
// x-ratelimit-limit, -remaining and -reset of the most restrictive bucket.
func Headers(ds []tollgate.Decision, legacy bool) []Header {
	f := Render(ds)
	var out []Header
	add := func(name, v string) {
		if v != "" {
			out = append(out, Header{Name: name, Value: v})
		}
	}
	policy, limit := leaseItems(ds)
	add("ratelimit-policy", join(f.Policy, policy))
	add("ratelimit", join(f.RateLimit, limit))
	if Denied(ds) {
		add("retry-after", f.RetryAfter)
	}
	if legacy {
		add("x-ratelimit-limit", f.LegacyLimit)
		add("x-ratelimit-remaining", f.LegacyRemaining)
		add("x-ratelimit-reset", f.LegacyReset)
	}
	return out
}

// ConcurrentUnit is the quota unit parameter (`qu`) of a concurrency
// limit's RateLimit-Policy item: its quota counts requests in flight, not
// requests per window, so the item has no `w`.
const ConcurrentUnit = `;qu="concurrent-requests"`

// leaseItems are the RateLimit-Policy and RateLimit items of the leases
// behind ds (see docs/leases.md): `"<rule>";q=<concurrency>;qu="concurrent-requests"`
// for each pool that applied, and, when a lease was held, `"<rule>";r=<slots
// left>`, or, when the pool was full, `"<rule>";r=0` with t, the seconds
// until the earliest live lease expires, if a retry can pass. A degraded
// lease says nothing: no pool was consulted. These are rendered here rather
// than in Render, whose output the Rust client and the server share through
// the test vectors.
func leaseItems(ds []tollgate.Decision) (policy, limit string) {
	var ps, ls []string
	for i := range ds {
		d := &ds[i]
		l := d.Lease
		if l == nil || l.Degraded || l.Rule == "" {
			continue
		}
		ps = append(ps, sfString(l.Rule)+";q="+strconv.FormatUint(l.Limit, 10)+ConcurrentUnit)
		switch {
		case l.Granted:
			left := uint64(0)
			if l.InFlight < l.Limit {
				left = l.Limit - l.InFlight
			}
			ls = append(ls, sfString(l.Rule)+";r="+strconv.FormatUint(left, 10))
		case d.LeaseDenied():
			item := sfString(l.Rule) + ";r=0"
			if d.RetryAfter > 0 {
				item += ";t=" + strconv.FormatInt(CeilSeconds(d.RetryAfter), 10)
			}
			ls = append(ls, item)
		}
	}
	return strings.Join(ps, ", "), strings.Join(ls, ", ")
}

func join(a, b string) string {
	switch {
	case a == "":
		return b
	case b == "":
		return a
	default:
		return a + ", " + b
	}
}

// CeilSeconds is d in whole seconds, rounded up.
func CeilSeconds(d time.Duration) int64 {
	s := int64(d / time.Second)
	if d%time.Second > 0 {
		s++
	}
	return s
}

// Denied reports whether any of the decisions denied.
func Denied(ds []tollgate.Decision) bool {
	for i := range ds {
		if !ds[i].Allowed {
			return true
		}
	}
	return false
}

// RetryAfter is, for a denial, the wait after which every denied decision
// would pass: the longest of their RetryAfters. Entries of an atomic batch
// denied only because another entry was
// ([tollgate.Decision.DeniedByBatch]) have no wait of their own and are
// skipped. ok is false when nothing was denied, or when some denial can
// never pass by retrying.
func RetryAfter(ds []tollgate.Decision) (wait time.Duration, ok bool) {
	for i := range ds {
		if ds[i].Allowed || ds[i].DeniedByBatch() {
			continue
		}
		if ds[i].RetryAfter <= 0 {
			return 0, false
		}
		ok = true
		wait = max(wait, ds[i].RetryAfter)
	}
	return wait, ok
}

// ViolatedPolicies names the rules that denied, each once, in order.
func ViolatedPolicies(ds []tollgate.Decision) []string {
	var out []string
	for i := range ds {
		for _, rule := range ds[i].ViolatedPolicies() {
			if !slices.Contains(out, rule) {
				out = append(out, rule)
			}
		}
	}
	return out
}

// Reasons collects Tollgate's reasons for denials that no retry can pass.
func Reasons(ds []tollgate.Decision) []string {
	var out []string
	for i := range ds {
		if !ds[i].Allowed && ds[i].Reason != "" && !slices.Contains(out, ds[i].Reason) {
			out = append(out, ds[i].Reason)
		}
	}
	return out
}

// Render renders the rate-limit fields of the decisions behind one
// response. Degraded decisions add nothing: no bucket was consulted, so
// there is nothing true to say about one.
func Render(ds []tollgate.Decision) Fields {
	denial := Denied(ds)
	type item struct {
		rule string
		n    uint64
		t    int64 // -1: no t parameter; for a policy, its w
	}
	var policies, limits []item
	for i := range ds {
		d := &ds[i]
		if d.Degraded {
			continue
		}
		for _, b := range d.Buckets {
			if !slices.ContainsFunc(policies, func(it item) bool { return it.rule == b.Rule }) {
				policies = append(policies, item{rule: b.Rule, n: b.Limit, t: window(b.RefillPeriod)})
			}
			if denial && (d.Allowed || !b.Exhausted) {
				continue
			}
			t := CeilSeconds(b.ResetAfter)
			if denial {
				t = -1
				if b.RetryAfter > 0 {
					t = CeilSeconds(b.RetryAfter)
				}
			}
			merged := false
			for j := range limits {
				if limits[j].rule == b.Rule {
					limits[j].n = min(limits[j].n, b.Remaining)
					limits[j].t = max(limits[j].t, t)
					merged = true
				}
			}
			if !merged {
				limits = append(limits, item{rule: b.Rule, n: b.Remaining, t: t})
			}
		}
	}

	var f Fields
	var sb strings.Builder
	for i, p := range policies {
		if i > 0 {
			sb.WriteString(", ")
		}
		sb.WriteString(sfString(p.rule))
		sb.WriteString(";q=")
		sb.WriteString(strconv.FormatUint(p.n, 10))
		if p.t >= 0 {
			sb.WriteString(";w=")
			sb.WriteString(strconv.FormatInt(p.t, 10))
		}
	}
	f.Policy = sb.String()
	sb.Reset()
	for i, l := range limits {
		if i > 0 {
			sb.WriteString(", ")
		}
		sb.WriteString(sfString(l.rule))
		sb.WriteString(";r=")
		sb.WriteString(strconv.FormatUint(l.n, 10))
		if l.t >= 0 {
			sb.WriteString(";t=")
			sb.WriteString(strconv.FormatInt(l.t, 10))
		}
	}
	f.RateLimit = sb.String()
	if wait, ok := RetryAfter(ds); ok {
		f.RetryAfter = strconv.FormatInt(CeilSeconds(wait), 10)
	}
	if d := mostRestrictive(ds, denial); d != nil {
		f.LegacyLimit = strconv.FormatUint(d.Limit, 10)
		f.LegacyRemaining = strconv.FormatUint(d.Remaining, 10)
		f.LegacyReset = strconv.FormatInt(CeilSeconds(d.ResetAfter), 10)
	}
	return f
}

// window is the w parameter of a bucket's policy: its refill period in whole
// seconds, rounded up, or -1 (no w) when the period is unknown.
func window(refill time.Duration) int64 {
	if refill <= 0 {
		return -1
	}
	return CeilSeconds(refill)
}

// mostRestrictive picks the decision the legacy trio describes: on a denial
// the denied one with the longest wait (one that can never pass counts as
// longest; of equal waits, the last, as in Rust), else the one with the
// fewest tokens left (of equals, the first).
func mostRestrictive(ds []tollgate.Decision, denial bool) *tollgate.Decision {
	var best *tollgate.Decision
	for i := range ds {
		d := &ds[i]
		if d.Degraded || d.Limit == 0 || (denial && (d.Allowed || d.DeniedByBatch())) {
			continue
		}
		switch {
		case best == nil:
			best = d
		case denial && waitKey(d) >= waitKey(best):
			best = d
		case !denial && d.Remaining < best.Remaining:
			best = d
		}
	}
	return best
}

func waitKey(d *tollgate.Decision) time.Duration {
	if d.RetryAfter <= 0 {
		return time.Duration(1<<63 - 1)
	}
	return d.RetryAfter
}

// sfString renders a rule name as a Structured Field String (RFC 9651
// section 3.3.3), by the rule in the mapping above. It works on bytes, so
// a name that is not valid UTF-8 is kept too.
func sfString(s string) string {
	const hex = "0123456789ABCDEF"
	var sb strings.Builder
	sb.Grow(len(s) + 2)
	sb.WriteByte('"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"' || c == '\\':
			sb.WriteByte('\\')
			sb.WriteByte(c)
		case c >= ' ' && c <= '~':
			sb.WriteByte(c)
		default:
			sb.WriteByte('%')
			sb.WriteByte(hex[c>>4])
			sb.WriteByte(hex[c&0xF])
		}
	}
	sb.WriteByte('"')
	return sb.String()
}
