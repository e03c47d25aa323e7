package grpclimit_test

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/grpclimit"
	"github.com/tollgate-rs/tollgate/clients/go/internal/tollgatetest"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// An open Watch stream holds the pool's one slot: other calls are refused
// until the stream's client cancels it, and then pass at once.
func TestAStreamHoldsALeaseUntilItsClientCancels(t *testing.T) {
	tg := tollgatetest.Start(t, `
scopes:
  - name: api
    limits:
      - {name: calls, per: scope, concurrency: 1}
`)
	c, err := tollgate.NewClient(tg.Addr, tollgate.WithDeadline(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	l, err := grpclimit.New(c, grpclimit.Config{
		Scope:       grpclimit.Static("api"),
		Operation:   grpclimit.FullMethod(),
		Concurrency: &grpclimit.Concurrency{TTL: time.Minute, Unavailable: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	checker := serveBoth(t, l)

	if _, err := checker.Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("a unary call alone: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	watch, err := checker.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := watch.Recv(); err != nil {
		t.Fatalf("the stream: %v", err)
	}
	_, err = checker.Check(context.Background(), &healthpb.HealthCheckRequest{})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("a call while the stream holds the slot: %v, want UNAVAILABLE (a backend pool)", err)
	}
	cancel()
	gone := time.Now()
	waitFor(t, "the slot to come back", 3*time.Second, func() bool {
		_, err := checker.Check(context.Background(), &healthpb.HealthCheckRequest{})
		return err == nil
	})
	t.Logf("the slot came back %v after the stream was cancelled (lease TTL 1m)", time.Since(gone))
}

// serveBoth is serve with l on unary and streaming calls alike.
func serveBoth(t *testing.T, l *grpclimit.Limiter) healthpb.HealthClient {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(l.UnaryServerInterceptor()), grpc.StreamInterceptor(l.StreamServerInterceptor()))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return healthpb.NewHealthClient(conn)
}

func waitFor(t *testing.T, what string, within time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
