// Package interop checks that grpclimit.Limiter works inside the real
// go-grpc-middleware v2 ratelimit interceptor, against the real tollgate.
package interop

import (
	"context"
	"net"
	"strings"
	"testing"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/ratelimit"
	"github.com/tollgate-rs/tollgate/clients/go/grpclimit"
	"github.com/tollgate-rs/tollgate/clients/go/internal/tollgatetest"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// The compiler checks the fit; the test checks the behaviour.
var _ ratelimit.Limiter = (*grpclimit.Limiter)(nil)

func TestGrpcMiddlewareRatelimitInterceptorDeniesWithOurLimiter(t *testing.T) {
	tg := tollgatetest.Start(t, `
scopes:
  - name: api
    limits:
      - name: per-method
        per: operation
        operations: ["/grpc.health.v1.Health/Check"]
        capacity: 2
        refill_period: 10s
`)
	c, err := tollgate.NewClient(tg.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	limiter, err := grpclimit.New(c, grpclimit.Config{Scope: grpclimit.Static("api"), Operation: grpclimit.FullMethod()})
	if err != nil {
		t.Fatal(err)
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(ratelimit.UnaryServerInterceptor(limiter)))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go func() { _ = srv.Serve(l) }()
	defer srv.Stop()
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)

	for i := 0; i < 2; i++ {
		if _, err := client.Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	_, err = client.Check(context.Background(), &healthpb.HealthCheckRequest{})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "rate limited by per-method") {
		t.Fatalf("third call: %v", err)
	}
}

// The stream interceptor calls Limit with the stream's context, where the
// method and the header metadata work as on a unary call's.
func TestGrpcMiddlewareRatelimitStreamInterceptorDeniesWithOurLimiter(t *testing.T) {
	tg := tollgatetest.Start(t, `
scopes:
  - name: api
    limits:
      - name: per-method
        per: operation
        operations: ["/grpc.health.v1.Health/Watch"]
        capacity: 2
        refill_period: 10s
`)
	c, err := tollgate.NewClient(tg.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	limiter, err := grpclimit.New(c, grpclimit.Config{Scope: grpclimit.Static("api"), Operation: grpclimit.FullMethod()})
	if err != nil {
		t.Fatal(err)
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.StreamInterceptor(ratelimit.StreamServerInterceptor(limiter)))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go func() { _ = srv.Serve(l) }()
	defer srv.Stop()
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	watch := func() (metadata.MD, error) {
		stream, err := client.Watch(ctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			return nil, err
		}
		_, err = stream.Recv()
		header, _ := stream.Header()
		return header, err
	}
	for i := 0; i < 2; i++ {
		header, err := watch()
		if err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
		if got := header.Get("ratelimit"); len(got) != 1 || !strings.HasPrefix(got[0], `"per-method";r=`) {
			t.Fatalf("stream %d: ratelimit metadata %v", i, got)
		}
	}
	_, err = watch()
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "rate limited by per-method") {
		t.Fatalf("third stream: %v", err)
	}
}
