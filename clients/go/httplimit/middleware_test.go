package httplimit_test

import (
	"bytes"
	"compress/gzip"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/httplimit"
	"github.com/tollgate-rs/tollgate/clients/go/internal/tollgatetest"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

const oneEach = `
scopes:
  - name: demo
    limits:
      - name: per-user
        per: identity
        capacity: 1
        refill_period: 10s
`

// serve puts the middleware in front of a handler that records the bodies
// it gets, on a plain httptest server.
func serve(t *testing.T, addr string, cfg httplimit.Config, opts ...tollgate.Option) (*httptest.Server, *recorder) {
	t.Helper()
	c, err := tollgate.NewClient(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	limit, err := httplimit.New(c, cfg)
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	srv := httptest.NewServer(limit(rec))
	t.Cleanup(srv.Close)
	return srv, rec
}

type recorder struct {
	mu     sync.Mutex
	bodies []string
}

func (rec *recorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	rec.mu.Lock()
	rec.bodies = append(rec.bodies, string(b))
	rec.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

func (rec *recorder) count() int {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return len(rec.bodies)
}

func do(t *testing.T, client *http.Client, req *http.Request) *http.Response {
	t.Helper()
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp
}

func get(t *testing.T, url, user string) *http.Response {
	req, _ := http.NewRequest("GET", url, nil)
	if user != "" {
		req.Header.Set("X-User", user)
	}
	return do(t, http.DefaultClient, req)
}

func TestAnExtractorErrorIs400AndReachesNothing(t *testing.T) {
	tg := tollgatetest.Start(t, oneEach)
	srv, rec := serve(t, tg.Addr, httplimit.Config{
		Scope:    httplimit.Static("demo"),
		Identity: httplimit.Required("X-User", httplimit.Header("X-User")),
	})
	resp := get(t, srv.URL, "")
	if resp.StatusCode != 400 || resp.Header.Get("Content-Type") != "application/problem+json" || rec.count() != 0 {
		t.Fatalf("got %d %q, upstream saw %d", resp.StatusCode, resp.Header.Get("Content-Type"), rec.count())
	}
}

// An identity Tollgate refuses (too long) must not slip through fail-open.
func TestInputTollgateRefusesIs400EvenWhenFailingOpen(t *testing.T) {
	tg := tollgatetest.Start(t, oneEach)
	srv, rec := serve(t, tg.Addr, httplimit.Config{
		Scope:    httplimit.Static("demo"),
		Identity: httplimit.Header("X-User"),
	}, tollgate.WithFailureMode(tollgate.FailOpen))
	resp := get(t, srv.URL, strings.Repeat("x", 300))
	if resp.StatusCode != 400 || rec.count() != 0 {
		t.Fatalf("got %d, upstream saw %d", resp.StatusCode, rec.count())
	}
}

func TestOnErrorHearsOfRequestsLetThroughByFailOpen(t *testing.T) {
	tg := tollgatetest.Start(t, oneEach)
	var mu sync.Mutex
	var heard []error
	srv, rec := serve(t, tg.Addr, httplimit.Config{
		Scope:    httplimit.Static("demo"),
		Identity: httplimit.Header("X-User"),
		OnError: func(_ *http.Request, err error) {
			mu.Lock()
			heard = append(heard, err)
			mu.Unlock()
		},
	})
	tg.Stop()
	if resp := get(t, srv.URL, "alice"); resp.StatusCode != 204 || rec.count() != 1 {
		t.Fatalf("got %d, upstream saw %d", resp.StatusCode, rec.count())
	}
	mu.Lock()
	defer mu.Unlock()
	if len(heard) != 1 || heard[0] == nil {
		t.Fatalf("OnError heard %v", heard)
	}
}

func TestMCPPassesAChunkedBodyOnWhole(t *testing.T) {
	tg := tollgatetest.Start(t, oneEach)
	srv, rec := serve(t, tg.Addr, httplimit.Config{Scope: httplimit.Static("demo"), MCP: true})
	body := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}}`
	// An io.Reader of unknown length makes the client send chunks.
	req, _ := http.NewRequest("POST", srv.URL, io.MultiReader(strings.NewReader(body[:10]), strings.NewReader(body[10:])))
	if resp := do(t, http.DefaultClient, req); resp.StatusCode != 204 {
		t.Fatalf("got %d", resp.StatusCode)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.bodies) != 1 || rec.bodies[0] != body {
		t.Fatalf("upstream got %q", rec.bodies)
	}
}

func TestAnMCPBatchOfMoreOperationsThanABatchMayCarryIs400(t *testing.T) {
	tg := tollgatetest.Start(t, oneEach)
	srv, rec := serve(t, tg.Addr, httplimit.Config{Scope: httplimit.Static("demo"), MCP: true})
	calls := make([]string, tollgate.MaxBatch+1)
	for i := range calls {
		calls[i] = fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"t%d"}}`, i, i)
	}
	req, _ := http.NewRequest("POST", srv.URL, strings.NewReader("["+strings.Join(calls, ",")+"]"))
	if resp := do(t, http.DefaultClient, req); resp.StatusCode != 400 || rec.count() != 0 {
		t.Fatalf("got %d, upstream saw %d", resp.StatusCode, rec.count())
	}
}

func TestMCPModeDecidesOtherMethodsAsPlainRequests(t *testing.T) {
	tg := tollgatetest.Start(t, oneEach)
	srv, _ := serve(t, tg.Addr, httplimit.Config{
		Scope:     httplimit.Static("demo"),
		Identity:  httplimit.Header("X-User"),
		Operation: httplimit.MethodPath(),
		MCP:       true,
	})
	if resp := get(t, srv.URL+"/mcp", "alice"); resp.StatusCode != 204 {
		t.Fatalf("first GET: %d", resp.StatusCode)
	}
	resp := get(t, srv.URL+"/mcp", "alice")
	if resp.StatusCode != 429 || resp.Header.Get("Content-Type") != "application/problem+json" {
		t.Fatalf("second GET: %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
}

func TestMCPPathLimitsJSONRPCReadingToTheMCPEndpoint(t *testing.T) {
	tg := tollgatetest.Start(t, `
scopes:
  - name: demo
    limits:
      - name: calls
        per: identity
        capacity: 2
        refill_period: 10s
`)
	srv, _ := serve(t, tg.Addr, httplimit.Config{
		Scope:    httplimit.Static("demo"),
		Identity: httplimit.Header("X-User"),
		MCP:      true,
		MCPPath:  "/mcp",
	})
	batch := `[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"}]`
	post := func(path string) *http.Response {
		req, _ := http.NewRequest("POST", srv.URL+path, strings.NewReader(batch))
		req.Header.Set("X-User", "alice")
		return do(t, http.DefaultClient, req)
	}
	// Elsewhere, the batch is one plain request: one token of two.
	if resp := post("/other"); resp.StatusCode != 204 || resp.Header.Get("RateLimit") != `"calls";r=1;t=5` {
		t.Fatalf("POST /other: %d %q", resp.StatusCode, resp.Header.Get("RateLimit"))
	}
	// On the MCP endpoint, two calls need two tokens and one is left.
	if resp := post("/mcp"); resp.StatusCode != 429 || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("POST /mcp: %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
}

func TestTheMTLSPeerIsTheIdentity(t *testing.T) {
	tg := tollgatetest.Start(t, oneEach)
	c, err := tollgate.NewClient(tg.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	limit, err := httplimit.New(c, httplimit.Config{Scope: httplimit.Static("demo"), Identity: httplimit.PeerCommonName()})
	if err != nil {
		t.Fatal(err)
	}
	ca := newCA(t)
	srv := httptest.NewUnstartedServer(limit(&recorder{}))
	srv.TLS = &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.pool}
	srv.StartTLS()
	defer srv.Close()
	clientFor := func(cn string) *http.Client {
		hc := srv.Client()
		transport := hc.Transport.(*http.Transport).Clone()
		transport.TLSClientConfig.Certificates = []tls.Certificate{ca.issue(t, cn)}
		return &http.Client{Transport: transport}
	}
	alice, bob := clientFor("alice"), clientFor("bob")
	req := func() *http.Request { r, _ := http.NewRequest("GET", srv.URL, nil); return r }

	if resp := do(t, alice, req()); resp.StatusCode != 204 {
		t.Fatalf("alice's first: %d", resp.StatusCode)
	}
	if resp := do(t, alice, req()); resp.StatusCode != 429 {
		t.Fatalf("alice's second: %d", resp.StatusCode)
	}
	if resp := do(t, bob, req()); resp.StatusCode != 204 {
		t.Fatalf("bob's first: %d", resp.StatusCode)
	}
}

func TestNewRefusesAConfigWithoutScope(t *testing.T) {
	if _, err := httplimit.New(&tollgate.Client{}, httplimit.Config{}); err == nil {
		t.Fatal("no error")
	}
}

func TestExtractors(t *testing.T) {
	r := httptest.NewRequest("GET", "/tenants/acme/items?x=1", nil)
	r.Header.Set("X-Key", "k1")
	r.RemoteAddr = "192.0.2.7:5555"
	for name, c := range map[string]struct {
		e    httplimit.Extractor
		want string
	}{
		"header":      {httplimit.Header("X-Key"), "k1"},
		"path":        {httplimit.Path(), "/tenants/acme/items"},
		"method-path": {httplimit.MethodPath(), "GET /tenants/acme/items"},
		"segment":     {httplimit.PathSegment(1), "acme"},
		"no segment":  {httplimit.PathSegment(9), ""},
		"remote ip":   {httplimit.RemoteIP(), "192.0.2.7"},
		"no cert":     {httplimit.PeerCommonName(), ""},
		"first of":    {httplimit.FirstOf(httplimit.Header("X-Missing"), httplimit.RemoteIP()), "192.0.2.7"},
		"a func":      {func(r *http.Request) (string, error) { return r.URL.Query().Get("x"), nil }, "1"},
	} {
		if got, err := c.e(r); err != nil || got != c.want {
			t.Errorf("%s: got %q, %v; want %q", name, got, err, c.want)
		}
	}
	if _, err := httplimit.Required("X-Missing", httplimit.Header("X-Missing"))(r); err == nil {
		t.Error("Required let an empty answer through")
	}
	boom := errors.New("boom")
	if _, err := httplimit.FirstOf(func(*http.Request) (string, error) { return "", boom })(r); !errors.Is(err, boom) {
		t.Errorf("FirstOf lost the error: %v", err)
	}
}

// ca is a throwaway certificate authority for the mTLS test.
type ca struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newCA(t *testing.T) *ca {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &ca{cert: cert, key: key, pool: pool}
}

func (c *ca) issue(t *testing.T, cn string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// postMCP sends body as a POST with X-User alice and any extra headers.
func postMCP(t *testing.T, url, body string, header ...string) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest("POST", url, strings.NewReader(body))
	req.Header.Set("X-User", "alice")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

type rpcReply struct {
	ID    json.RawMessage `json:"id"`
	Error struct {
		Code int `json:"code"`
	} `json:"error"`
}

func TestAmbiguousMCPBodiesAreParseErrorsThatChargeAndForwardNothing(t *testing.T) {
	tg := tollgatetest.Start(t, oneEach)
	srv, rec := serve(t, tg.Addr, httplimit.Config{
		Scope: httplimit.Static("demo"), Identity: httplimit.Header("X-User"), MCP: true,
	})
	batch := `[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"},{"jsonrpc":"2.0","id":3,"method":"ping"}]`
	for _, body := range []string{
		`{"jsonrpc":"2.0","id":1,"method":"tools/list","Method":"tools/call","params":{"name":"search"}}`,
		`{"jsonrpc":"2.0","id":1,"Method":"tools/call","params":{"name":"search"},"result":{}}`,
		`{"jsonrpc":"2.0","id":1,"Method":"tools/call","method":"notifications/initialized"}`,
		"\ufeff" + batch,
		batch[:len(batch)-1] + ",]",
	} {
		resp, b := postMCP(t, srv.URL+"/mcp", body)
		var rpc rpcReply
		if resp.StatusCode != 400 || resp.Header.Get("Content-Type") != "application/json" ||
			json.Unmarshal(b, &rpc) != nil || rpc.Error.Code != -32700 || string(rpc.ID) != "null" {
			t.Fatalf("%q: %d %q %s", body, resp.StatusCode, resp.Header.Get("Content-Type"), b)
		}
	}
	if rec.count() != 0 {
		t.Fatalf("the upstream saw %d refused bodies", rec.count())
	}
	// Nothing was charged: alice's one token is still there.
	if resp, b := postMCP(t, srv.URL+"/mcp", `{"jsonrpc":"2.0","id":9,"method":"ping"}`); resp.StatusCode != 204 {
		t.Fatalf("a plain call after the refusals: %d %s", resp.StatusCode, b)
	}
}

func TestPathVariantsOfTheMCPEndpointAreChargedPerCall(t *testing.T) {
	tg := tollgatetest.Start(t, `
scopes:
  - name: demo
    limits:
      - name: calls
        per: identity
        capacity: 2
        refill_period: 60s
`)
	srv, rec := serve(t, tg.Addr, httplimit.Config{
		Scope: httplimit.Static("demo"), Identity: httplimit.Header("X-User"), MCP: true, MCPPath: "/mcp",
	})
	batch := `[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"},{"jsonrpc":"2.0","id":3,"method":"ping"}]`
	for _, path := range []string{"/mcp/", "//mcp", "/MCP", "/x/../mcp"} {
		// Three calls need three tokens of two: refused whole, whatever
		// the spelling of the endpoint.
		if resp, b := postMCP(t, srv.URL+path, batch); resp.StatusCode != 429 || resp.Header.Get("Content-Type") != "application/json" {
			t.Fatalf("POST %s: %d %s", path, resp.StatusCode, b)
		}
	}
	if rec.count() != 0 {
		t.Fatalf("the upstream saw %d batches", rec.count())
	}
}

func TestCompressedMCPBodiesAre415AndChargeNothing(t *testing.T) {
	tg := tollgatetest.Start(t, oneEach)
	srv, rec := serve(t, tg.Addr, httplimit.Config{
		Scope: httplimit.Static("demo"), Identity: httplimit.Header("X-User"), MCP: true,
	})
	var gz bytes.Buffer
	w := gzip.NewWriter(&gz)
	_, _ = w.Write([]byte(`[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"}]`))
	_ = w.Close()
	for _, enc := range []string{"gzip", "br", "identity, gzip", "GZIP"} {
		req, _ := http.NewRequest("POST", srv.URL+"/mcp", bytes.NewReader(gz.Bytes()))
		req.Header.Set("X-User", "alice")
		req.Header["Content-Encoding"] = []string{enc}
		resp := do(t, http.DefaultClient, req)
		if resp.StatusCode != http.StatusUnsupportedMediaType || resp.Header.Get("Accept-Encoding") != "identity" {
			t.Fatalf("Content-Encoding %q: %d %q", enc, resp.StatusCode, resp.Header.Get("Accept-Encoding"))
		}
	}
	if rec.count() != 0 {
		t.Fatalf("the upstream saw %d compressed bodies", rec.count())
	}
	// identity is no encoding at all, and nothing was charged before.
	if resp, b := postMCP(t, srv.URL+"/mcp", `{"jsonrpc":"2.0","id":9,"method":"ping"}`, "Content-Encoding", "identity"); resp.StatusCode != 204 {
		t.Fatalf("identity: %d %s", resp.StatusCode, b)
	}
}

func TestTheMCPDenialCodeIs429UnlessConfigured(t *testing.T) {
	for _, tc := range []struct{ set, want int }{{0, 429}, {-32023, -32023}, {-32029, -32029}} {
		tg := tollgatetest.Start(t, oneEach)
		srv, _ := serve(t, tg.Addr, httplimit.Config{
			Scope: httplimit.Static("demo"), Identity: httplimit.Header("X-User"), MCP: true, MCPErrorCode: tc.set,
		})
		call := `{"jsonrpc":"2.0","id":1,"method":"ping"}`
		postMCP(t, srv.URL, call)
		resp, b := postMCP(t, srv.URL, call)
		var rpc rpcReply
		if resp.StatusCode != 429 || json.Unmarshal(b, &rpc) != nil || rpc.Error.Code != tc.want {
			t.Fatalf("MCPErrorCode %d: %d %s, want code %d", tc.set, resp.StatusCode, b, tc.want)
		}
	}
}

const oneASecondShaped = `
scopes:
  - name: demo
    limits:
      - { name: per-user, per: identity, capacity: 1, refill_period: 1s, max_delay: 20s }
`

// Shaping: MaxWait is cut to what is left before the request's deadline. A
// request that needs a 1 s wait is refused (429) behind a 0.5 s timeout, and
// held for its wait, then forwarded with RateLimit-Delay, without one.
func TestMaxWaitHoldsARequestButNeverPastItsDeadline(t *testing.T) {
	tg := tollgatetest.Start(t, oneASecondShaped)
	c, err := tollgate.NewClient(tg.Addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	limit, err := httplimit.New(c, httplimit.Config{
		Scope:    httplimit.Static("demo"),
		Identity: httplimit.Header("X-User"),
		MaxWait:  20 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	patient := httptest.NewServer(limit(rec))
	t.Cleanup(patient.Close)
	hurried := httptest.NewServer(http.TimeoutHandler(limit(rec), 500*time.Millisecond, "timeout"))
	t.Cleanup(hurried.Close)

	if resp := get(t, patient.URL, "ann"); resp.StatusCode != http.StatusNoContent {
		t.Fatalf("first: %d", resp.StatusCode)
	}
	if resp := get(t, hurried.URL, "ann"); resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("behind a 0.5 s deadline, a 1 s wait: %d", resp.StatusCode)
	}
	start := time.Now()
	resp := get(t, patient.URL, "ann")
	held := time.Since(start)
	if resp.StatusCode != http.StatusNoContent || rec.count() != 2 {
		t.Fatalf("held: %d, upstream saw %d", resp.StatusCode, rec.count())
	}
	wait, err := strconv.ParseFloat(resp.Header.Get("RateLimit-Delay"), 64)
	if err != nil || wait <= 0.5 || wait > 1 {
		t.Fatalf("RateLimit-Delay %q", resp.Header.Get("RateLimit-Delay"))
	}
	if held < time.Duration(wait*float64(time.Second))-10*time.Millisecond {
		t.Fatalf("held %v for a delay of %.3f s", held, wait)
	}
}

// A caller Tollgate has banned (here: on the scope's deny list) gets the
// abnormal-usage problem type, not quota-exceeded.
func TestABannedCallerGetsTheAbnormalUsageProblemType(t *testing.T) {
	tg := tollgatetest.Start(t, oneEach+"    deny: [\"mallory\"]\n")
	srv, rec := serve(t, tg.Addr, httplimit.Config{
		Scope:    httplimit.Static("demo"),
		Identity: httplimit.Header("X-User"),
	})
	for _, tc := range []struct{ user, want string }{
		{"mallory", httplimit.AbnormalUsageType},
		{"alice", ""},
		{"alice", httplimit.QuotaExceededType},
	} {
		req, _ := http.NewRequest("GET", srv.URL, nil)
		req.Header.Set("X-User", tc.user)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if tc.want == "" {
			if resp.StatusCode != 204 {
				t.Fatalf("%s: got %d", tc.user, resp.StatusCode)
			}
			continue
		}
		var p struct {
			Type string `json:"type"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&p); err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != 429 || p.Type != tc.want {
			t.Fatalf("%s: got %d %q, want 429 %q", tc.user, resp.StatusCode, p.Type, tc.want)
		}
	}
	if rec.count() != 1 {
		t.Fatalf("upstream saw %d requests, want alice's first", rec.count())
	}
}
