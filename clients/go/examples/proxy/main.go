// Command proxy is a reverse proxy that asks Tollgate about every request
// before passing it upstream, built on the httplimit middleware.
//
//	go run ./examples/proxy -listen 127.0.0.1:8080 -upstream http://127.0.0.1:9000 \
//	    -tollgate 127.0.0.1:50051 -scope demo -identity-header X-User [-mcp] [-concurrency]
//
// It prints "listening on ADDR" once it accepts connections (with -listen
// on port 0 that is how to learn the port), and drains in-flight requests on
// SIGINT or SIGTERM.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/httplimit"
	"github.com/tollgate-rs/tollgate/clients/go/mcp"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "proxy:", err)
		os.Exit(2)
	}
}

type options struct {
	listen         string
	upstream       string
	tollgate       string
	scope          string
	identityHeader string
	operation      string
	mcp            bool
	mcpPath        string
	maxBodyBytes   int64
	mcpErrorCode   int
	failureMode    string
	deadline       time.Duration
	legacyHeaders  bool
	maxWait        time.Duration
	concurrency    bool
	leaseTTL       time.Duration
	denyStatus     int
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.listen, "listen", "127.0.0.1:8080", "`HOST:PORT` to serve on (port 0 picks one)")
	fs.StringVar(&o.upstream, "upstream", "", "`URL` to pass allowed requests to (required)")
	fs.StringVar(&o.tollgate, "tollgate", "127.0.0.1:50051", "Tollgate's gRPC `HOST:PORT`")
	fs.StringVar(&o.scope, "scope", "", "the Tollgate scope whose rules apply (required)")
	fs.StringVar(&o.identityHeader, "identity-header", "", "header naming the caller; empty: the client's IP")
	fs.StringVar(&o.operation, "operation", "path", "operation of a plain request: path, method-path (\"GET /x\"), or none")
	fs.BoolVar(&o.mcp, "mcp", false, "MCP-aware: charge each JSON-RPC call in a POST body under its method (tools/call:<name>, ...)")
	fs.StringVar(&o.mcpPath, "mcp-path", "", "with -mcp, only POSTs to this path are read as JSON-RPC; empty: every POST")
	fs.Int64Var(&o.maxBodyBytes, "max-body-bytes", httplimit.DefaultMaxBodyBytes, "with -mcp, the largest body read; bigger ones get a 413")
	fs.IntVar(&o.mcpErrorCode, "mcp-error-code", mcp.RateLimitedCode, "with -mcp, the JSON-RPC error code of a denied call (-32023: SEP-3304's proposal; -32029: before 2026-07-28)")
	fs.StringVar(&o.failureMode, "failure-mode", "open", "when Tollgate cannot answer: open (pass requests on) or closed (503)")
	fs.DurationVar(&o.deadline, "deadline", tollgate.DefaultDeadline, "how long to wait for Tollgate's answer, such as 50ms")
	fs.BoolVar(&o.legacyHeaders, "legacy-headers", false, "also send X-RateLimit-Limit, -Remaining and -Reset")
	fs.DurationVar(&o.maxWait, "max-wait", 0, "shaping: hold a request up to this long when a limit with max_delay admits it for later, such as 2s; 0: never")
	fs.BoolVar(&o.concurrency, "concurrency", false, "hold a lease in the scope's concurrency limit for the lifetime of each request (with -mcp: each tools/call)")
	fs.DurationVar(&o.leaseTTL, "lease-ttl", httplimit.DefaultLeaseTTL, "with -concurrency, each lease's time to live, renewed every third of it; at most the limit's max_lease")
	fs.IntVar(&o.denyStatus, "concurrency-status", http.StatusTooManyRequests, "with -concurrency, the status when the pool is full: 429, or 503 for a pool protecting the upstream")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if o.upstream == "" || o.scope == "" {
		return o, errors.New("-upstream and -scope are required")
	}
	return o, nil
}

// run serves until ctx ends, then drains.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	upstream, err := url.Parse(o.upstream)
	if err != nil || upstream.Scheme == "" || upstream.Host == "" {
		return fmt.Errorf("-upstream %q: want an absolute URL such as http://127.0.0.1:9000", o.upstream)
	}
	mode, err := tollgate.ParseFailureMode(o.failureMode)
	if err != nil {
		return fmt.Errorf("-failure-mode: %w", err)
	}
	var operation httplimit.Extractor
	switch o.operation {
	case "method-path":
		operation = httplimit.MethodPath()
	case "path":
		operation = httplimit.Path()
	case "none":
	default:
		return fmt.Errorf("-operation %q: want method-path, path or none", o.operation)
	}
	identity := httplimit.RemoteIP()
	if o.identityHeader != "" {
		identity = httplimit.Header(o.identityHeader)
	}

	client, err := tollgate.NewClient(o.tollgate, tollgate.WithDeadline(o.deadline), tollgate.WithFailureMode(mode))
	if err != nil {
		return err
	}
	defer client.Close()

	logger := log.New(stderr, "proxy: ", log.LstdFlags)
	errorLog := &throttledLog{logger: logger, every: time.Second}
	var concurrency *httplimit.Concurrency
	if o.concurrency {
		concurrency = &httplimit.Concurrency{TTL: o.leaseTTL, DenyStatus: o.denyStatus}
	}
	limit, err := httplimit.New(client, httplimit.Config{
		Scope:         httplimit.Static(o.scope),
		Identity:      identity,
		Operation:     operation,
		LegacyHeaders: o.legacyHeaders,
		MCP:           o.mcp,
		MCPPath:       o.mcpPath,
		MaxBodyBytes:  o.maxBodyBytes,
		MCPErrorCode:  o.mcpErrorCode,
		MaxWait:       o.maxWait,
		Concurrency:   concurrency,
		OnError:       func(r *http.Request, err error) { errorLog.printf("%s %s: %v", r.Method, r.URL.Path, err) },
	})
	if err != nil {
		return err
	}
	proxy := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(upstream)
			pr.SetXForwarded()
		},
		ErrorLog: logger,
	}

	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           limit(proxy),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          logger,
	}
	fmt.Fprintf(stdout, "listening on %s\n", ln.Addr())

	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	drain, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return srv.Shutdown(drain)
}

// throttledLog prints at most one line per period and counts the rest, so
// a Tollgate outage under load is one line a second, not one per request.
type throttledLog struct {
	logger *log.Logger
	every  time.Duration

	mu      sync.Mutex
	last    time.Time
	skipped int
}

func (t *throttledLog) printf(format string, args ...any) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now()
	if now.Sub(t.last) < t.every {
		t.skipped++
		return
	}
	if t.skipped > 0 {
		format += fmt.Sprintf(" (and %d more since the last line)", t.skipped)
	}
	t.last, t.skipped = now, 0
	t.logger.Printf(format, args...)
}
