// Command latency measures what the Go client adds to a call: sequential
// requests straight to a target against the same requests through the
// client or the middleware, against the real tollgate binary, all on
// 127.0.0.1.
//
//	TOLLGATE_BIN=/path/to/tollgate go run ./bench/latency [-n 20000] [-json bench/latency/results.json]
//
// Pairs measured (each row's "added" is its percentile minus its
// baseline's):
//
//	grpc direct        ShouldAllow on the generated stub, one reused connection
//	grpc client        tollgate.Client.Decide (deadline, breaker, conversion)
//	http direct        GET to a net/http server whose handler answers 204
//	http middleware    the same through httplimit (one Decide per request)
//	mcp direct         POST of a JSON-RPC tools/call to the same handler
//	mcp middleware     the same through httplimit with MCP on (read, parse, Decide)
//
// The scenarios run interleaved in short rounds (20 calls each by
// default), so a noisy neighbour slows all of them alike rather than one.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	tollgatev1 "github.com/tollgate-rs/tollgate/clients/go/gen/tollgate/v1"
	"github.com/tollgate-rs/tollgate/clients/go/httplimit"
	"github.com/tollgate-rs/tollgate/clients/go/internal/tollgatetest"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Every call is allowed: the biggest bucket Tollgate accepts, refilled in a
// second, so the measurement is of the allow path the traffic mostly takes.
const config = `
scopes:
  - name: bench
    limits:
      - name: per-user
        per: identity
        capacity: 50000000
        refill_period: 1s
      - name: per-tool
        per: identity_operation
        operations: ["tools/call:*"]
        capacity: 50000000
        refill_period: 1s
`

const rpcBody = `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":{"q":"tollgate"}}}`

type scenario struct {
	name     string
	baseline string // the scenario this one adds to; empty for a baseline
	call     func() error
	samples  []time.Duration
}

type result struct {
	Name       string  `json:"name"`
	Baseline   string  `json:"baseline,omitempty"`
	N          int     `json:"n"`
	P50Micros  float64 `json:"p50_us"`
	P99Micros  float64 `json:"p99_us"`
	AddedP50us float64 `json:"added_p50_us,omitempty"`
	AddedP99us float64 `json:"added_p99_us,omitempty"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "latency:", err)
		os.Exit(1)
	}
}

func run() error {
	n := flag.Int("n", 20000, "measured calls per scenario")
	warmup := flag.Int("warmup", 1000, "unmeasured calls per scenario first")
	rounds := flag.Int("rounds", 1000, "interleaved rounds the calls are split into")
	jsonOut := flag.String("json", "", "also write the results as JSON to this `file`")
	bin := flag.String("tollgate-bin", os.Getenv(tollgatetest.BinEnv), "the tollgate binary (default $TOLLGATE_BIN)")
	flag.Parse()
	if *bin == "" {
		return fmt.Errorf("no tollgate binary: set %s or -tollgate-bin", tollgatetest.BinEnv)
	}

	dir, err := os.MkdirTemp("", "tollgate-latency")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	srv, err := tollgatetest.Launch(*bin, dir, config)
	if err != nil {
		return err
	}
	defer srv.Stop()
	ctx := context.Background()

	conn, err := grpc.NewClient(srv.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	stub := tollgatev1.NewRateLimiterClient(conn)
	client, err := tollgate.NewClient(srv.Addr)
	if err != nil {
		return err
	}
	defer client.Close()

	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.WriteHeader(http.StatusNoContent)
	})
	plain := httptest.NewServer(handler)
	defer plain.Close()
	limit, err := httplimit.New(client, httplimit.Config{Scope: httplimit.Static("bench"), Identity: httplimit.Header("X-User")})
	if err != nil {
		return err
	}
	limited := httptest.NewServer(limit(handler))
	defer limited.Close()
	mcpLimit, err := httplimit.New(client, httplimit.Config{Scope: httplimit.Static("bench"), Identity: httplimit.Header("X-User"), MCP: true})
	if err != nil {
		return err
	}
	mcpLimited := httptest.NewServer(mcpLimit(handler))
	defer mcpLimited.Close()
	httpClient := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}

	send := func(method, url, body string) error {
		var r io.Reader
		if body != "" {
			r = strings.NewReader(body)
		}
		req, err := http.NewRequest(method, url, r)
		if err != nil {
			return err
		}
		req.Header.Set("X-User", "bench")
		resp, err := httpClient.Do(req)
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusNoContent {
			return fmt.Errorf("%s %s: status %d", method, url, resp.StatusCode)
		}
		return nil
	}
	scenarios := []*scenario{
		{name: "grpc direct", call: func() error {
			resp, err := stub.ShouldAllow(ctx, &tollgatev1.ShouldAllowRequest{Scope: "bench", Identity: "bench"})
			if err == nil && !resp.GetAllowed() {
				err = fmt.Errorf("denied: %v", resp)
			}
			return err
		}},
		{name: "grpc client", baseline: "grpc direct", call: func() error {
			d, err := client.Decide(ctx, tollgate.Request{Scope: "bench", Identity: "bench"})
			if err == nil && (!d.Allowed || d.Degraded) {
				err = fmt.Errorf("not a counted allow: %+v", d)
			}
			return err
		}},
		{name: "http direct", call: func() error { return send("GET", plain.URL, "") }},
		{name: "http middleware", baseline: "http direct", call: func() error { return send("GET", limited.URL, "") }},
		{name: "mcp direct", call: func() error { return send("POST", plain.URL, rpcBody) }},
		{name: "mcp middleware", baseline: "mcp direct", call: func() error { return send("POST", mcpLimited.URL, rpcBody) }},
	}

	for _, s := range scenarios {
		for i := 0; i < *warmup; i++ {
			if err := s.call(); err != nil {
				return fmt.Errorf("%s: %w", s.name, err)
			}
		}
	}
	perRound := max(*n / *rounds, 1)
	for r := 0; r < *rounds; r++ {
		for _, s := range scenarios {
			for i := 0; i < perRound; i++ {
				start := time.Now()
				if err := s.call(); err != nil {
					return fmt.Errorf("%s: %w", s.name, err)
				}
				s.samples = append(s.samples, time.Since(start))
			}
		}
	}

	results := summarize(scenarios)
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "path\tn\tp50 µs\tp99 µs\tadded p50 µs\tadded p99 µs\t")
	for _, r := range results {
		added50, added99 := "", ""
		if r.Baseline != "" {
			added50, added99 = fmt.Sprintf("%+.0f", r.AddedP50us), fmt.Sprintf("%+.0f", r.AddedP99us)
		}
		fmt.Fprintf(tw, "%s\t%d\t%.0f\t%.0f\t%s\t%s\t\n", r.Name, r.N, r.P50Micros, r.P99Micros, added50, added99)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if *jsonOut != "" {
		out, err := json.MarshalIndent(results, "", "  ")
		if err != nil {
			return err
		}
		return os.WriteFile(*jsonOut, append(out, '\n'), 0o644)
	}
	return nil
}

func summarize(scenarios []*scenario) []result {
	byName := map[string]result{}
	var out []result
	for _, s := range scenarios {
		slices.Sort(s.samples)
		r := result{
			Name:      s.name,
			Baseline:  s.baseline,
			N:         len(s.samples),
			P50Micros: micros(percentile(s.samples, 0.50)),
			P99Micros: micros(percentile(s.samples, 0.99)),
		}
		if b, ok := byName[s.baseline]; ok {
			r.AddedP50us = r.P50Micros - b.P50Micros
			r.AddedP99us = r.P99Micros - b.P99Micros
		}
		byName[s.name] = r
		out = append(out, r)
	}
	return out
}

// percentile of sorted samples, nearest rank.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted))*p+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
