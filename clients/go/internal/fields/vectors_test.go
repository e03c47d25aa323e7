package fields

import (
	"bytes"
	"encoding/json"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

// vectorsPath is the file the Rust crate tollgate-headers checks too, from
// this package's directory (where go test runs).
const vectorsPath = "../../../headers/vectors.json"

// The file's shape. Every key is present (the Rust test checks that, and
// that no optional wait is 0, which Go could not tell from none); unknown
// keys are an error here, so a new field cannot be silently ignored.
type vectorFile struct {
	About   []string `json:"about"`
	Vectors []vector `json:"vectors"`
}

type vector struct {
	Name       string           `json:"name"`
	Why        string           `json:"why"`
	Decisions  []vectorDecision `json:"decisions"`
	Middleware struct {
		Legacy  bool        `json:"legacy"`
		Headers [][2]string `json:"headers"`
	} `json:"middleware"`
	// Envoy is what the server renders for Envoy; the Go client renders no
	// such thing.
	Envoy json.RawMessage `json:"envoy"`
}

type vectorDecision struct {
	Allowed      bool           `json:"allowed"`
	Degraded     bool           `json:"degraded"`
	RetryAfterNs *int64         `json:"retry_after_ns"`
	Reason       *string        `json:"reason"`
	Limit        uint64         `json:"limit"`
	Remaining    uint64         `json:"remaining"`
	ResetAfterNs int64          `json:"reset_after_ns"`
	Buckets      []vectorBucket `json:"buckets"`
}

type vectorBucket struct {
	Rule           string `json:"rule"`
	Limit          uint64 `json:"limit"`
	Remaining      uint64 `json:"remaining"`
	ResetAfterNs   int64  `json:"reset_after_ns"`
	RetryAfterNs   *int64 `json:"retry_after_ns"`
	Exhausted      bool   `json:"exhausted"`
	RefillPeriodNs *int64 `json:"refill_period_ns"`
}

// wait is an optional wait as the client's types hold it: 0 for none.
func wait(ns *int64) time.Duration {
	if ns == nil {
		return 0
	}
	return time.Duration(*ns)
}

// decision is what tollgate.Client would have made of Tollgate's answer.
func (v vectorDecision) decision() tollgate.Decision {
	d := tollgate.Decision{
		Allowed:    v.Allowed,
		Degraded:   v.Degraded,
		RetryAfter: wait(v.RetryAfterNs),
		Limit:      v.Limit,
		Remaining:  v.Remaining,
		ResetAfter: time.Duration(v.ResetAfterNs),
	}
	if v.Reason != nil {
		d.Reason = *v.Reason
	}
	for _, b := range v.Buckets {
		d.Buckets = append(d.Buckets, tollgate.Bucket{
			Rule:         b.Rule,
			Limit:        b.Limit,
			Remaining:    b.Remaining,
			ResetAfter:   time.Duration(b.ResetAfterNs),
			RetryAfter:   wait(b.RetryAfterNs),
			Exhausted:    b.Exhausted,
			RefillPeriod: wait(b.RefillPeriodNs),
		})
	}
	return d
}

func loadVectors(t *testing.T) []vector {
	t.Helper()
	raw, err := os.ReadFile(vectorsPath)
	if err != nil {
		t.Fatalf("the shared header vectors: %v", err)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	var f vectorFile
	if err := dec.Decode(&f); err != nil {
		t.Fatalf("%s: %v", vectorsPath, err)
	}
	// A file emptied by mistake would pass every vector.
	if len(f.Vectors) < 20 {
		t.Fatalf("%s: only %d vectors", vectorsPath, len(f.Vectors))
	}
	return f.Vectors
}

func TestTheMiddlewareHeadersMatchTheSharedVectors(t *testing.T) {
	for _, v := range loadVectors(t) {
		t.Run(v.Name, func(t *testing.T) {
			ds := make([]tollgate.Decision, len(v.Decisions))
			for i, d := range v.Decisions {
				ds[i] = d.decision()
			}
			var got [][2]string
			for _, h := range Headers(ds, v.Middleware.Legacy) {
				got = append(got, [2]string{h.Name, h.Value})
			}
			if !slices.Equal(got, v.Middleware.Headers) {
				t.Fatalf("%s\ngot  %q\nwant %q", v.Why, got, v.Middleware.Headers)
			}
		})
	}
}
