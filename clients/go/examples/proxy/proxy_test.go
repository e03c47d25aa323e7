package main

// These tests run the proxy as a real process (built once, in TestMain) in
// front of the real tollgate binary and an httptest upstream, and speak
// HTTP to it, as a client would.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/internal/tollgatetest"
)

var proxyBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "tollgate-proxy-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	proxyBin = filepath.Join(dir, "proxy")
	build := exec.Command("go", "build", "-o", proxyBin, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building the proxy:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// upstream records what reached it.
type upstream struct {
	*httptest.Server
	mu     sync.Mutex
	bodies [][]byte
}

func startUpstream(t *testing.T) *upstream {
	u := &upstream{}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		u.mu.Lock()
		u.bodies = append(u.bodies, body)
		u.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"jsonrpc":"2.0","id":1,"result":{}}`)
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *upstream) received() [][]byte {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([][]byte(nil), u.bodies...)
}

// startProxy runs the proxy binary with -listen on port 0 and returns its
// base URL once it prints where it listens.
func startProxy(t *testing.T, tollgateAddr, upstreamURL string, extra ...string) string {
	t.Helper()
	args := append([]string{
		"-listen", "127.0.0.1:0",
		"-upstream", upstreamURL,
		"-tollgate", tollgateAddr,
		"-identity-header", "X-User",
	}, extra...)
	cmd := exec.Command(proxyBin, args...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("proxy output:\n%s", stderr.String())
		}
	})
	line := make(chan string, 1)
	go func() {
		s := bufio.NewScanner(stdout)
		if s.Scan() {
			line <- s.Text()
		}
		close(line)
	}()
	select {
	case l, ok := <-line:
		addr, found := strings.CutPrefix(l, "listening on ")
		if !ok || !found {
			t.Fatalf("proxy did not start: %q", l)
		}
		return "http://" + addr
	case <-time.After(10 * time.Second):
		t.Fatal("proxy did not say where it listens within 10s")
	}
	return ""
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func send(t *testing.T, method, url, user, body string) response {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		t.Fatal(err)
	}
	if user != "" {
		req.Header.Set("X-User", user)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: b}
}

func expectHeader(t *testing.T, r response, name, want string) {
	t.Helper()
	if got := r.header.Get(name); got != want {
		t.Fatalf("%s = %q, want %q (status %d, body %s)", name, got, want, r.status, r.body)
	}
}

const twoRules = `
scopes:
  - name: demo
    limits:
      - name: per-user
        per: identity
        capacity: 2
        refill_period: 2s
      - name: global
        per: scope
        capacity: 100
        refill_period: 100s
`

func TestAllowedRequestsPassWithRateLimitHeaders(t *testing.T) {
	srv := tollgatetest.Start(t, twoRules)
	up := startUpstream(t)
	proxy := startProxy(t, srv.Addr, up.URL, "-scope", "demo")

	r := send(t, "GET", proxy+"/items", "alice", "")
	if r.status != 200 || string(r.body) != `{"jsonrpc":"2.0","id":1,"result":{}}` {
		t.Fatalf("first request: %d %s", r.status, r.body)
	}
	expectHeader(t, r, "RateLimit-Policy", `"per-user";q=2;w=2, "global";q=100;w=100`)
	expectHeader(t, r, "RateLimit", `"per-user";r=1;t=1, "global";r=99;t=1`)
	expectHeader(t, r, "X-RateLimit-Limit", "")
	expectHeader(t, r, "Retry-After", "")
}

func TestADeniedRequestIs429WithHeadersAndProblemAndPassesAfterRetryAfter(t *testing.T) {
	srv := tollgatetest.Start(t, twoRules)
	up := startUpstream(t)
	proxy := startProxy(t, srv.Addr, up.URL, "-scope", "demo")

	for i := 0; i < 2; i++ {
		if r := send(t, "GET", proxy+"/items", "alice", ""); r.status != 200 {
			t.Fatalf("request %d: %d %s", i, r.status, r.body)
		}
	}
	r := send(t, "GET", proxy+"/items", "alice", "")
	if r.status != http.StatusTooManyRequests {
		t.Fatalf("third request: %d %s", r.status, r.body)
	}
	// Two of 2 taken, one back per second: the wait is just under 1s.
	expectHeader(t, r, "Retry-After", "1")
	expectHeader(t, r, "RateLimit-Policy", `"per-user";q=2;w=2, "global";q=100;w=100`)
	expectHeader(t, r, "RateLimit", `"per-user";r=0;t=1`)
	expectHeader(t, r, "Content-Type", "application/problem+json")
	var problem struct {
		Type             string   `json:"type"`
		Title            string   `json:"title"`
		Status           int      `json:"status"`
		Detail           string   `json:"detail"`
		ViolatedPolicies []string `json:"violated-policies"`
	}
	if err := json.Unmarshal(r.body, &problem); err != nil {
		t.Fatalf("body %s: %v", r.body, err)
	}
	if problem.Type != "https://iana.org/assignments/http-problem-types#quota-exceeded" ||
		problem.Status != 429 || problem.Title == "" || problem.Detail != "Retry in 1 s." ||
		len(problem.ViolatedPolicies) != 1 || problem.ViolatedPolicies[0] != "per-user" {
		t.Fatalf("problem: %+v", problem)
	}
	if n := len(up.received()); n != 2 {
		t.Fatalf("the upstream saw %d requests, want 2: the denied one must not reach it", n)
	}
	if other := send(t, "GET", proxy+"/items", "bob", ""); other.status != 200 {
		t.Fatalf("bob has his own bucket: %d", other.status)
	}

	wait, _ := strconv.Atoi(r.header.Get("Retry-After"))
	time.Sleep(time.Duration(wait) * time.Second)
	if again := send(t, "GET", proxy+"/items", "alice", ""); again.status != 200 {
		t.Fatalf("after Retry-After: %d %s", again.status, again.body)
	}
}

func TestLegacyHeadersOnRequest(t *testing.T) {
	srv := tollgatetest.Start(t, twoRules)
	up := startUpstream(t)
	proxy := startProxy(t, srv.Addr, up.URL, "-scope", "demo", "-legacy-headers")

	r := send(t, "GET", proxy+"/", "alice", "")
	expectHeader(t, r, "X-RateLimit-Limit", "2")
	expectHeader(t, r, "X-RateLimit-Remaining", "1")
	expectHeader(t, r, "X-RateLimit-Reset", "1")
	send(t, "GET", proxy+"/", "alice", "")
	denied := send(t, "GET", proxy+"/", "alice", "")
	if denied.status != 429 {
		t.Fatalf("third: %d", denied.status)
	}
	expectHeader(t, denied, "X-RateLimit-Remaining", "0")
	expectHeader(t, denied, "RateLimit", `"per-user";r=0;t=1`)
}

func TestFailOpenPassesRequestsWhenTollgateIsStopped(t *testing.T) {
	srv := tollgatetest.Start(t, twoRules)
	up := startUpstream(t)
	proxy := startProxy(t, srv.Addr, up.URL, "-scope", "demo")
	if r := send(t, "GET", proxy+"/", "alice", ""); r.status != 200 {
		t.Fatalf("with Tollgate up: %d", r.status)
	}
	srv.Stop()

	start := time.Now()
	for i := 0; i < 5; i++ {
		r := send(t, "GET", proxy+"/", "alice", "")
		if r.status != 200 {
			t.Fatalf("request %d with Tollgate stopped: %d %s", i, r.status, r.body)
		}
		// Nothing was counted, so nothing true can be said about a bucket.
		expectHeader(t, r, "RateLimit", "")
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("5 fail-open requests took %s", took)
	}
	if n := len(up.received()); n != 6 {
		t.Fatalf("the upstream saw %d requests, want 6", n)
	}
}

func TestFailClosedAnswers503WhenTollgateIsStopped(t *testing.T) {
	srv := tollgatetest.Start(t, twoRules)
	up := startUpstream(t)
	proxy := startProxy(t, srv.Addr, up.URL, "-scope", "demo", "-failure-mode", "closed", "-deadline", "20ms")
	if r := send(t, "GET", proxy+"/", "alice", ""); r.status != 200 {
		t.Fatalf("with Tollgate up: %d", r.status)
	}
	srv.Stop()

	r := send(t, "GET", proxy+"/", "alice", "")
	if r.status != http.StatusServiceUnavailable {
		t.Fatalf("with Tollgate stopped: %d %s", r.status, r.body)
	}
	expectHeader(t, r, "Content-Type", "application/problem+json")
	if n := len(up.received()); n != 1 {
		t.Fatalf("the upstream saw %d requests, want 1", n)
	}
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for send(t, "GET", proxy+"/", "alice", "").status != 200 {
		if time.Now().After(deadline) {
			t.Fatal("still refusing 5s after Tollgate came back")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

const mcpRules = `
scopes:
  - name: mcp
    limits:
      - name: search
        per: identity_operation
        operations: ["tools/call:search"]
        capacity: 2
        refill_period: 10s
      - name: calls
        per: identity
        operations: ["tools/call:*"]
        capacity: 10
        refill_period: 10s
`

type rpcError struct {
	ID    json.RawMessage `json:"id"`
	Error struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
		Data    struct {
			RetryAfterSeconds int      `json:"retryAfterSeconds"`
			RetryAfterMs      int      `json:"retryAfterMs"`
			ViolatedPolicies  []string `json:"violatedPolicies"`
		} `json:"data"`
	} `json:"error"`
}

func TestMCPChargesEachCallAndRefusesABatchWhole(t *testing.T) {
	srv := tollgatetest.Start(t, mcpRules)
	up := startUpstream(t)
	proxy := startProxy(t, srv.Addr, up.URL, "-scope", "mcp", "-mcp", "-mcp-path", "/mcp")
	post := func(body string) response { return send(t, "POST", proxy+"/mcp", "alice", body) }

	// Odd spacing and key order: the upstream must get these bytes as sent.
	search1 := "{ \"params\": {\"name\":\"search\", \"arguments\":{\"q\":\"caf\u00e9\"}},\n \"method\":\"tools/call\", \"id\":1, \"jsonrpc\":\"2.0\" }"
	r := post(search1)
	if r.status != 200 {
		t.Fatalf("first search: %d %s", r.status, r.body)
	}
	expectHeader(t, r, "RateLimit", `"search";r=1;t=5, "calls";r=9;t=1`)
	if got := up.received(); len(got) != 1 || string(got[0]) != search1 {
		t.Fatalf("the upstream got %q, want the body unchanged", got)
	}

	// Notifications and responses are never charged.
	for i := 0; i < 5; i++ {
		if r := post(`{"jsonrpc":"2.0","method":"notifications/initialized"}`); r.status != 200 {
			t.Fatalf("notification %d: %d", i, r.status)
		}
	}
	if r := post(`{"jsonrpc":"2.0","id":99,"result":{}}`); r.status != 200 {
		t.Fatalf("response: %d", r.status)
	}

	// One search token is left; this batch needs two, so it is refused
	// whole and takes nothing.
	batch := `[{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"search"}},
	           {"jsonrpc":"2.0","id":"three","method":"tools/call","params":{"name":"search"}},
	           {"jsonrpc":"2.0","method":"notifications/progress"}]`
	before := len(up.received())
	r = post(batch)
	if r.status != http.StatusTooManyRequests {
		t.Fatalf("batch: %d %s", r.status, r.body)
	}
	if len(up.received()) != before {
		t.Fatal("a refused batch reached the upstream")
	}
	expectHeader(t, r, "Content-Type", "application/json")
	retryAfter, err := strconv.Atoi(r.header.Get("Retry-After"))
	if err != nil || retryAfter < 4 || retryAfter > 5 {
		t.Fatalf("Retry-After = %q, want the time until 2 search tokens (about 5s)", r.header.Get("Retry-After"))
	}
	var errs []rpcError
	if err := json.Unmarshal(r.body, &errs); err != nil || len(errs) != 2 {
		t.Fatalf("want an array of 2 JSON-RPC errors (the notification gets none), got %s", r.body)
	}
	for i, wantID := range []string{`2`, `"three"`} {
		e := errs[i]
		if string(e.ID) != wantID || e.Error.Code != 429 || e.Error.Data.RetryAfterSeconds != retryAfter ||
			e.Error.Data.RetryAfterMs <= 0 || strings.Join(e.Error.Data.ViolatedPolicies, ",") != "search" {
			t.Fatalf("error %d: %+v", i, e)
		}
	}

	// The refused batch took nothing: the last search token is still there.
	if r := post(`{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"search"}}`); r.status != 200 {
		t.Fatalf("search after the refused batch: %d %s", r.status, r.body)
	}
	r = post(`{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"search"}}`)
	var single rpcError
	if r.status != 429 || json.Unmarshal(r.body, &single) != nil || string(single.ID) != "5" || single.Error.Code != 429 {
		t.Fatalf("a denied single call: %d %s", r.status, r.body)
	}
	if r.header.Get("Retry-After") == "" {
		t.Fatal("a denied single call has no Retry-After")
	}

	// Other tools and other methods have their own limits, or none.
	if r := post(`{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"fetch"}}`); r.status != 200 {
		t.Fatalf("fetch: %d %s", r.status, r.body)
	}
	if r := post(`{"jsonrpc":"2.0","id":7,"method":"tools/list"}`); r.status != 200 {
		t.Fatalf("tools/list: %d %s", r.status, r.body)
	}
}

// Three operations with their own limits and one limit over all calls, with
// refill periods of an hour: in a test's few seconds no whole token comes
// back, so a token seen missing was taken.
const mcpMixedRules = `
scopes:
  - name: mcp
    limits:
      - name: search
        per: identity_operation
        operations: ["tools/call:search"]
        capacity: 2
        refill_period: 1h
      - name: fetch
        per: identity_operation
        operations: ["tools/call:fetch"]
        capacity: 5
        refill_period: 1h
      - name: calls
        per: identity
        capacity: 10
        refill_period: 1h
`

func TestARefusedMixedBatchTakesNothingFromTheOperationsThatHadRoom(t *testing.T) {
	srv := tollgatetest.Start(t, mcpMixedRules)
	up := startUpstream(t)
	proxy := startProxy(t, srv.Addr, up.URL, "-scope", "mcp", "-mcp", "-mcp-path", "/mcp")
	post := func(body string) response { return send(t, "POST", proxy+"/mcp", "alice", body) }
	search := func(id int) string {
		return fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"search"}}`, id)
	}
	fetch := func(id int) string {
		return fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"fetch"}}`, id)
	}

	// Search is spent: search 0 of 2 left, calls 8 of 10.
	for id := 1; id <= 2; id++ {
		if r := post(search(id)); r.status != 200 {
			t.Fatalf("search %d: %d %s", id, r.status, r.body)
		}
	}
	// fetch and tools/list have room (fetch needs 2 of 5, calls 4 of 8);
	// search has none, so the batch is refused whole.
	r := post("[" + fetch(3) + "," + fetch(4) + "," + search(5) + `,{"jsonrpc":"2.0","id":6,"method":"tools/list"}]`)
	if r.status != http.StatusTooManyRequests {
		t.Fatalf("mixed batch: %d %s", r.status, r.body)
	}
	if n := len(up.received()); n != 2 {
		t.Fatalf("the upstream saw %d requests, want the 2 searches only", n)
	}
	// The wait is search's (one token back every 30 minutes), not lost for
	// the entries that were denied only because search was.
	retryAfter, err := strconv.Atoi(r.header.Get("Retry-After"))
	if err != nil || retryAfter < 1790 || retryAfter > 1800 {
		t.Fatalf("Retry-After = %q, want search's wait of about 1800 s", r.header.Get("Retry-After"))
	}
	expectHeader(t, r, "RateLimit", fmt.Sprintf(`"search";r=0;t=%d`, retryAfter))
	expectHeader(t, r, "RateLimit-Policy", `"fetch";q=5;w=3600, "calls";q=10;w=3600, "search";q=2;w=3600`)
	var errs []rpcError
	if err := json.Unmarshal(r.body, &errs); err != nil || len(errs) != 4 {
		t.Fatalf("want 4 JSON-RPC errors, got %s", r.body)
	}
	for i, e := range errs {
		if string(e.ID) != strconv.Itoa(i+3) || e.Error.Data.RetryAfterSeconds != retryAfter ||
			strings.Join(e.Error.Data.ViolatedPolicies, ",") != "search" {
			t.Fatalf("error %d: %+v", i, e)
		}
	}

	// Nothing was taken: one fetch now leaves fetch 5-1 and calls 8-1, as if
	// the batch had never been sent. Charging the batch's fetches and
	// tools/list would have left fetch 2 and calls 4.
	r = post(fetch(7))
	if r.status != 200 {
		t.Fatalf("fetch after the refused batch: %d %s", r.status, r.body)
	}
	if got := r.header.Get("RateLimit"); !strings.HasPrefix(got, `"fetch";r=4;`) || !strings.Contains(got, `"calls";r=7;`) {
		t.Fatalf("RateLimit after the refused batch = %q, want fetch r=4 and calls r=7", got)
	}
	// And a batch that fits is charged whole: 2 fetches and a tools/list
	// take fetch to 2 and calls to 4.
	r = post("[" + fetch(8) + "," + fetch(9) + `,{"jsonrpc":"2.0","id":10,"method":"tools/list"}]`)
	if r.status != 200 {
		t.Fatalf("a batch with room: %d %s", r.status, r.body)
	}
	if got := r.header.Get("RateLimit"); !strings.HasPrefix(got, `"fetch";r=2;`) || !strings.Contains(got, `"calls";r=4;`) {
		t.Fatalf("RateLimit after an allowed batch = %q, want fetch r=2 and calls r=4", got)
	}
}

func TestMCPBodiesOverTheCapAre413AndNeverReachTheUpstream(t *testing.T) {
	srv := tollgatetest.Start(t, mcpRules)
	up := startUpstream(t)
	proxy := startProxy(t, srv.Addr, up.URL, "-scope", "mcp", "-mcp", "-max-body-bytes", "100")

	small := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}}`
	if r := send(t, "POST", proxy+"/mcp", "alice", small); r.status != 200 {
		t.Fatalf("a body under the cap: %d %s", r.status, r.body)
	}
	big := `{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"search","arguments":{"q":"` + strings.Repeat("x", 100) + `"}}}`
	r := send(t, "POST", proxy+"/mcp", "alice", big)
	if r.status != http.StatusRequestEntityTooLarge {
		t.Fatalf("a body over the cap: %d %s", r.status, r.body)
	}
	if n := len(up.received()); n != 1 {
		t.Fatalf("the upstream saw %d requests, want 1", n)
	}
}

func TestMCPErrorCodeFlagSetsTheDenialCode(t *testing.T) {
	srv := tollgatetest.Start(t, mcpRules)
	up := startUpstream(t)
	proxy := startProxy(t, srv.Addr, up.URL, "-scope", "mcp", "-mcp", "-mcp-error-code", "-32023")
	search := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}}`
	for i := 0; i < 2; i++ {
		if r := send(t, "POST", proxy+"/mcp", "alice", search); r.status != 200 {
			t.Fatalf("search %d: %d %s", i, r.status, r.body)
		}
	}
	r := send(t, "POST", proxy+"/mcp", "alice", search)
	var e rpcError
	if r.status != 429 || json.Unmarshal(r.body, &e) != nil || e.Error.Code != -32023 {
		t.Fatalf("third search: %d %s, want code -32023", r.status, r.body)
	}
}

const shapedRule = `
scopes:
  - name: agents
    limits:
      - { name: per-team, per: identity, capacity: 10, refill_period: 1s, max_delay: 2s }
`

// Shaping (issue 24): a burst of 30 requests at once against 10/s, with
// -max-wait 2s, reaches the upstream spread at the rate, with no 429: ten
// at once, then one every 0.1 s. The upstream's arrival times are printed
// for the record.
func TestABurstIsSpreadAtTheRateInsteadOfRefused(t *testing.T) {
	srv := tollgatetest.Start(t, shapedRule)
	var mu sync.Mutex
	var arrivals []time.Time
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		arrivals = append(arrivals, time.Now())
		mu.Unlock()
	}))
	t.Cleanup(up.Close)
	proxy := startProxy(t, srv.Addr, up.URL, "-scope", "agents", "-max-wait", "2s")

	start := time.Now()
	statuses := make([]response, 30)
	var wg sync.WaitGroup
	for i := range statuses {
		wg.Add(1)
		go func() {
			defer wg.Done()
			statuses[i] = send(t, "GET", proxy+"/tools", "team-a", "")
		}()
	}
	wg.Wait()
	delayed := 0
	for i, r := range statuses {
		if r.status != http.StatusOK {
			t.Fatalf("request %d: %d %s", i, r.status, r.body)
		}
		if r.header.Get("RateLimit-Delay") != "" {
			delayed++
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(arrivals) != 30 {
		t.Fatalf("the upstream saw %d requests, want 30", len(arrivals))
	}
	offsets := make([]string, len(arrivals))
	for i, at := range arrivals {
		offsets[i] = fmt.Sprintf("%.3f", at.Sub(start).Seconds())
	}
	t.Logf("upstream arrival times (s after the burst was sent): %s", strings.Join(offsets, " "))
	if delayed != 20 {
		t.Fatalf("%d answers carry RateLimit-Delay, want 20", delayed)
	}
	// Released at 10/s: the k-th arrival after the first ten is at least
	// k·0.1 s after the first (less the spread of the burst's own
	// decisions), and the whole burst is through within about 2 s.
	first := arrivals[0]
	for k := 10; k < 30; k++ {
		want := time.Duration(k-9) * 100 * time.Millisecond
		if got := arrivals[k].Sub(first); got < want-150*time.Millisecond {
			t.Errorf("arrival %d came %v after the first, want at least %v", k, got, want)
		}
	}
	if last := arrivals[29].Sub(start); last > 3*time.Second {
		t.Errorf("the last request arrived %v after the burst", last)
	}
}

// With -concurrency and -mcp, each tools/call holds a lease for as long as
// the upstream takes: a second call while the first runs is refused, other
// methods are not leased, and the slot comes back when the first ends.
func TestConcurrencyHoldsALeasePerToolsCall(t *testing.T) {
	srv := tollgatetest.Start(t, `
scopes:
  - name: demo
    limits:
      - {name: tool-calls, per: identity, operations: ["tools/call:*"], concurrency: 1}
`)
	entered := make(chan struct{}, 1)
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if bytes.Contains(body, []byte(`"slow"`)) {
			entered <- struct{}{}
			<-release
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"jsonrpc":"2.0","id":1,"result":{}}`)
	}))
	t.Cleanup(up.Close)
	var once sync.Once
	open := func() { once.Do(func() { close(release) }) }
	t.Cleanup(open) // runs before up.Close, which waits for the handler
	proxy := startProxy(t, srv.Addr, up.URL, "-scope", "demo", "-mcp", "-concurrency", "-lease-ttl", "10s", "-deadline", "2s")
	call := func(tool string) string {
		return `{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"` + tool + `"}}`
	}

	first := make(chan response, 1)
	go func() { first <- send(t, "POST", proxy+"/mcp", "alice", call("slow")) }()
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the first call did not reach the upstream")
	}
	second := send(t, "POST", proxy+"/mcp", "alice", call("fast"))
	if second.status != http.StatusTooManyRequests || !bytes.Contains(second.body, []byte(`"error"`)) {
		t.Fatalf("a second tools/call while the first runs: %d %s", second.status, second.body)
	}
	if ra, err := strconv.Atoi(second.header.Get("Retry-After")); err != nil || ra < 1 || ra > 10 {
		t.Errorf("Retry-After %q: want 1..10 s", second.header.Get("Retry-After"))
	}
	expectHeader(t, second, "RateLimit-Policy", `"tool-calls";q=1;qu="concurrent-requests"`)
	if r := send(t, "POST", proxy+"/mcp", "alice", `{"jsonrpc":"2.0","id":8,"method":"tools/list"}`); r.status != http.StatusOK {
		t.Errorf("tools/list is not leased, yet got %d", r.status)
	}
	if r := send(t, "POST", proxy+"/mcp", "bob", call("fast")); r.status != http.StatusOK {
		t.Errorf("bob has a pool of his own, yet got %d", r.status)
	}
	open()
	if r := <-first; r.status != http.StatusOK {
		t.Fatalf("the first call: %d %s", r.status, r.body)
	}
	if r := send(t, "POST", proxy+"/mcp", "alice", call("fast")); r.status != http.StatusOK {
		t.Errorf("after the first call ended: %d %s", r.status, r.body)
	}
}
