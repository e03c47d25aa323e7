package fields

import (
	"slices"
	"testing"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

func bucket(rule string, limit, remaining uint64, reset, retry time.Duration, exhausted bool) tollgate.Bucket {
	return tollgate.Bucket{Rule: rule, Limit: limit, Remaining: remaining, ResetAfter: reset, RetryAfter: retry, Exhausted: exhausted}
}

func TestSecondsAreRoundedUp(t *testing.T) {
	for _, c := range []struct {
		d    time.Duration
		want int64
	}{{0, 0}, {time.Nanosecond, 1}, {time.Second, 1}, {time.Second + 1, 2}, {2500 * time.Millisecond, 3}} {
		if got := CeilSeconds(c.d); got != c.want {
			t.Errorf("CeilSeconds(%s) = %d, want %d", c.d, got, c.want)
		}
	}
}

func TestAnAllowedResponseListsEveryRuleWithTimeUntilFull(t *testing.T) {
	d := tollgate.Decision{Allowed: true, Limit: 10, Remaining: 4, ResetAfter: 1500 * time.Millisecond, Rule: "per-user", Buckets: []tollgate.Bucket{
		bucket("per-user", 10, 4, 1500*time.Millisecond, 0, false),
		bucket("global", 1000, 900, 6*time.Second, 0, false),
	}}
	f := Render([]tollgate.Decision{d})
	want := Fields{
		Policy:          `"per-user";q=10, "global";q=1000`,
		RateLimit:       `"per-user";r=4;t=2, "global";r=900;t=6`,
		LegacyLimit:     "10",
		LegacyRemaining: "4",
		LegacyReset:     "2",
	}
	if f != want {
		t.Fatalf("got  %+v\nwant %+v", f, want)
	}
}

func TestADenialShowsOnlyTheRulesThatDeniedWithTheirWait(t *testing.T) {
	d := tollgate.Decision{Allowed: false, RetryAfter: 2100 * time.Millisecond, Limit: 10, Remaining: 0, ResetAfter: 9 * time.Second, Rule: "per-user", Buckets: []tollgate.Bucket{
		bucket("per-user", 10, 0, 9*time.Second, 2100*time.Millisecond, true),
		bucket("global", 1000, 900, 6*time.Second, 0, false),
	}}
	f := Render([]tollgate.Decision{d})
	if f.Policy != `"per-user";q=10, "global";q=1000` || f.RateLimit != `"per-user";r=0;t=3` || f.RetryAfter != "3" {
		t.Fatalf("got %+v", f)
	}
	if got := ViolatedPolicies([]tollgate.Decision{d}); !slices.Equal(got, []string{"per-user"}) {
		t.Fatalf("violated: %v", got)
	}
}

func TestSeveralDecisionsMergePerRuleAndTheLongestWaitWins(t *testing.T) {
	search := tollgate.Decision{Allowed: false, RetryAfter: 4 * time.Second, Rule: "search", Limit: 2, Buckets: []tollgate.Bucket{
		bucket("search", 2, 1, 5*time.Second, 4*time.Second, true),
		bucket("calls", 10, 8, 2*time.Second, 0, false),
	}}
	fetch := tollgate.Decision{Allowed: false, RetryAfter: time.Second, Rule: "calls", Limit: 10, Buckets: []tollgate.Bucket{
		bucket("calls", 10, 0, 10*time.Second, time.Second, true),
	}}
	f := Render([]tollgate.Decision{search, fetch})
	if f.Policy != `"search";q=2, "calls";q=10` || f.RateLimit != `"search";r=1;t=4, "calls";r=0;t=1` || f.RetryAfter != "4" {
		t.Fatalf("got %+v", f)
	}
	if got := ViolatedPolicies([]tollgate.Decision{search, fetch}); !slices.Equal(got, []string{"search", "calls"}) {
		t.Fatalf("violated: %v", got)
	}
}

func TestADenialNoRetryCanPassPromisesNoRetryAfter(t *testing.T) {
	never := tollgate.Decision{Allowed: false, Reason: "cost 5 exceeds the capacity 2", Rule: "per-user", Limit: 2, Buckets: []tollgate.Bucket{
		bucket("per-user", 2, 2, 0, 0, true),
	}}
	soon := tollgate.Decision{Allowed: false, RetryAfter: time.Second, Rule: "x", Limit: 1, Buckets: []tollgate.Bucket{bucket("x", 1, 0, time.Second, time.Second, true)}}
	f := Render([]tollgate.Decision{soon, never})
	if f.RetryAfter != "" || f.RateLimit != `"x";r=0;t=1, "per-user";r=2` {
		t.Fatalf("got %+v", f)
	}
	if _, ok := RetryAfter([]tollgate.Decision{soon, never}); ok {
		t.Fatal("RetryAfter promised a wait that cannot succeed")
	}
}

func TestDegradedDecisionsAddNoFields(t *testing.T) {
	f := Render([]tollgate.Decision{{Allowed: true, Degraded: true}})
	if f != (Fields{}) {
		t.Fatalf("got %+v", f)
	}
}

func TestRuleNamesAreQuotedAsStructuredFieldStrings(t *testing.T) {
	if got := sfString(`a "b" \c` + "\u00e9\n"); got != `"a \"b\" \\c%C3%A9%0A"` {
		t.Fatalf("got %s", got)
	}
	// Bytes that are not UTF-8 are kept, not replaced.
	if got := sfString("x\xff"); got != `"x%FF"` {
		t.Fatalf("got %s", got)
	}
}

func TestThePolicyCarriesTheRefillPeriodAsWInWholeSecondsRoundedUp(t *testing.T) {
	perUser := bucket("per-user", 10, 4, 1500*time.Millisecond, 0, false)
	perUser.RefillPeriod = time.Minute
	burst := bucket("burst", 5, 5, 0, 0, false)
	burst.RefillPeriod = 1500 * time.Millisecond
	// An older Tollgate reports no period: the item has no w rather than a
	// wrong one.
	unknown := bucket("global", 1000, 900, 6*time.Second, 0, false)
	d := tollgate.Decision{Allowed: true, Limit: 10, Remaining: 4, Rule: "per-user", Buckets: []tollgate.Bucket{perUser, burst, unknown}}
	f := Render([]tollgate.Decision{d})
	if want := `"per-user";q=10;w=60, "burst";q=5;w=2, "global";q=1000`; f.Policy != want {
		t.Fatalf("Policy = %s, want %s", f.Policy, want)
	}
}

// An atomic batch denied by one entry denies the others too; they carry no
// wait of their own and must not hide the wait of the entry that denied.
func TestAnAtomicBatchDenialTakesItsWaitFromTheEntriesThatDenied(t *testing.T) {
	search := tollgate.Decision{Allowed: false, RetryAfter: 4200 * time.Millisecond, Rule: "search", Limit: 2, Buckets: []tollgate.Bucket{
		bucket("search", 2, 0, 9*time.Second, 4200*time.Millisecond, true),
		bucket("calls", 10, 7, 3*time.Second, 0, false),
	}}
	fetch := tollgate.Decision{Allowed: false, Buckets: []tollgate.Bucket{
		bucket("fetch", 5, 3, 2*time.Second, 0, false),
		bucket("calls", 10, 7, 3*time.Second, 0, false),
	}}
	if search.DeniedByBatch() || !fetch.DeniedByBatch() {
		t.Fatalf("DeniedByBatch: search %v, fetch %v", search.DeniedByBatch(), fetch.DeniedByBatch())
	}
	ds := []tollgate.Decision{fetch, search}
	if wait, ok := RetryAfter(ds); !ok || wait != 4200*time.Millisecond {
		t.Fatalf("RetryAfter = %s, %v; want 4.2s", wait, ok)
	}
	f := Render(ds)
	if f.RetryAfter != "5" || f.RateLimit != `"search";r=0;t=5` || f.LegacyLimit != "2" {
		t.Fatalf("got %+v", f)
	}
	if got := ViolatedPolicies(ds); !slices.Equal(got, []string{"search"}) {
		t.Fatalf("violated: %v", got)
	}
}

func TestALeaseAddsAConcurrentRequestsPolicyAndTheSlotsLeft(t *testing.T) {
	leased := func(granted bool, inFlight uint64) tollgate.Decision {
		d := tollgate.Decision{Allowed: granted, Lease: &tollgate.Lease{Granted: granted, Limit: 3, InFlight: inFlight, Rule: "streams"}}
		if !granted {
			d.RetryAfter = 2500 * time.Millisecond
		}
		return d
	}
	get := func(hs []Header, name string) string {
		for _, h := range hs {
			if h.Name == name {
				return h.Value
			}
		}
		return ""
	}
	hs := Headers([]tollgate.Decision{leased(true, 2)}, false)
	if got := get(hs, "ratelimit-policy"); got != `"streams";q=3;qu="concurrent-requests"` {
		t.Errorf("policy %q", got)
	}
	if got := get(hs, "ratelimit"); got != `"streams";r=1` {
		t.Errorf("allowed: ratelimit %q", got)
	}
	hs = Headers([]tollgate.Decision{leased(false, 3)}, false)
	if got := get(hs, "ratelimit"); got != `"streams";r=0;t=3` {
		t.Errorf("denied: ratelimit %q", got)
	}
	if got := get(hs, "retry-after"); got != "3" {
		t.Errorf("denied: retry-after %q", got)
	}
	if got := ViolatedPolicies([]tollgate.Decision{leased(false, 3)}); len(got) != 1 || got[0] != "streams" {
		t.Errorf("violated %v", got)
	}
	degraded := leased(true, 0)
	degraded.Lease.Degraded = true
	if hs := Headers([]tollgate.Decision{degraded}, false); len(hs) != 0 {
		t.Errorf("a degraded lease: %v", hs)
	}
}
