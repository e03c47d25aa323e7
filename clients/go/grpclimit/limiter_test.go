package grpclimit_test

import (
	"context"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/grpclimit"
	"github.com/tollgate-rs/tollgate/clients/go/internal/tollgatetest"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// The protected service is grpc-go's own health service: any unary method
// would do.
const perUserPerMethod = `
scopes:
  - name: api
    limits:
      - name: health-checks
        per: identity_operation
        operations: ["/grpc.health.v1.Health/*"]
        capacity: 2
        refill_period: 2s
`

// serve starts a grpc-go server guarded by interceptor and returns a
// health client to it.
func serve(t *testing.T, interceptor grpc.UnaryServerInterceptor) healthpb.HealthClient {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(interceptor))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return healthpb.NewHealthClient(conn)
}

// serveStreams is serve for streaming calls: the health service's Watch is
// a server stream.
func serveStreams(t *testing.T, interceptor grpc.StreamServerInterceptor) healthpb.HealthClient {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.StreamInterceptor(interceptor))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return healthpb.NewHealthClient(conn)
}

func limiter(t *testing.T, addr string, opts ...tollgate.Option) *grpclimit.Limiter {
	t.Helper()
	c, err := tollgate.NewClient(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	l, err := grpclimit.New(c, grpclimit.Config{
		Scope:     grpclimit.Static("api"),
		Identity:  grpclimit.Metadata("x-user"),
		Operation: grpclimit.FullMethod(),
	})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func check(client healthpb.HealthClient, user string) (metadata.MD, error) {
	ctx := metadata.AppendToOutgoingContext(context.Background(), "x-user", user)
	var header metadata.MD
	_, err := client.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Header(&header))
	return header, err
}

func TestADenialIsResourceExhaustedWithRetryInfoAndHeaders(t *testing.T) {
	tg := tollgatetest.Start(t, perUserPerMethod)
	client := serve(t, limiter(t, tg.Addr).UnaryServerInterceptor())

	header, err := check(client, "alice")
	if err != nil {
		t.Fatal(err)
	}
	if got := header.Get("ratelimit"); len(got) != 1 || got[0] != `"health-checks";r=1;t=1` {
		t.Fatalf("ratelimit metadata on an allowed call: %v", got)
	}
	if _, err := check(client, "alice"); err != nil {
		t.Fatal(err)
	}
	header, err = check(client, "alice")
	st := status.Convert(err)
	if st.Code() != codes.ResourceExhausted {
		t.Fatalf("third call: %v", err)
	}
	var retry *errdetails.RetryInfo
	var quota *errdetails.QuotaFailure
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.RetryInfo:
			retry = d
		case *errdetails.QuotaFailure:
			quota = d
		}
	}
	if retry == nil || retry.GetRetryDelay().AsDuration() <= 0 || retry.GetRetryDelay().AsDuration() > time.Second {
		t.Fatalf("RetryInfo: %v", retry)
	}
	if quota == nil || len(quota.GetViolations()) != 1 || quota.GetViolations()[0].GetSubject() != "health-checks" {
		t.Fatalf("QuotaFailure: %v", quota)
	}
	if got := header.Get("retry-after"); len(got) != 1 || got[0] != "1" {
		t.Fatalf("retry-after metadata: %v", got)
	}
	if _, err := check(client, "bob"); err != nil {
		t.Fatalf("bob has his own bucket: %v", err)
	}
	time.Sleep(retry.GetRetryDelay().AsDuration())
	if _, err := check(client, "alice"); err != nil {
		t.Fatalf("after the retry delay: %v", err)
	}
}

// watch opens a Watch stream as user and reads its first message, which the
// health service sends at once: an error means the stream was refused.
func watch(t *testing.T, client healthpb.HealthClient, user string) (metadata.MD, error) {
	t.Helper()
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(context.Background(), "x-user", user))
	t.Cleanup(cancel)
	stream, err := client.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return nil, err
	}
	_, err = stream.Recv()
	header, _ := stream.Header()
	return header, err
}

func TestAStreamIsDecidedOnceWhenItOpens(t *testing.T) {
	tg := tollgatetest.Start(t, perUserPerMethod)
	client := serveStreams(t, limiter(t, tg.Addr).StreamServerInterceptor())

	header, err := watch(t, client, "alice")
	if err != nil {
		t.Fatal(err)
	}
	if got := header.Get("ratelimit"); len(got) != 1 || got[0] != `"health-checks";r=1;t=1` {
		t.Fatalf("ratelimit metadata on an allowed stream: %v", got)
	}
	if _, err := watch(t, client, "alice"); err != nil {
		t.Fatal(err)
	}
	header, err = watch(t, client, "alice")
	st := status.Convert(err)
	if st.Code() != codes.ResourceExhausted {
		t.Fatalf("third stream: %v", err)
	}
	var retry *errdetails.RetryInfo
	for _, d := range st.Details() {
		if d, ok := d.(*errdetails.RetryInfo); ok {
			retry = d
		}
	}
	if retry == nil || retry.GetRetryDelay().AsDuration() <= 0 {
		t.Fatalf("RetryInfo: %v", st.Details())
	}
	if got := header.Get("retry-after"); len(got) != 1 || got[0] != "1" {
		t.Fatalf("retry-after metadata: %v", got)
	}
	if _, err := watch(t, client, "bob"); err != nil {
		t.Fatalf("bob has his own bucket: %v", err)
	}
}

func TestAStreamFailingClosedIsUnavailable(t *testing.T) {
	tg := tollgatetest.Start(t, perUserPerMethod)
	client := serveStreams(t, limiter(t, tg.Addr, tollgate.WithFailureMode(tollgate.FailClosed)).StreamServerInterceptor())
	tg.Stop()
	if _, err := watch(t, client, "alice"); status.Code(err) != codes.Unavailable {
		t.Fatalf("want UNAVAILABLE, got %v", err)
	}
}

func TestFailClosedIsUnavailableNotADenial(t *testing.T) {
	tg := tollgatetest.Start(t, perUserPerMethod)
	client := serve(t, limiter(t, tg.Addr, tollgate.WithFailureMode(tollgate.FailClosed)).UnaryServerInterceptor())
	tg.Stop()
	if _, err := check(client, "alice"); status.Code(err) != codes.Unavailable {
		t.Fatalf("want UNAVAILABLE, got %v", err)
	}
}

func TestFailOpenLetsCallsThrough(t *testing.T) {
	tg := tollgatetest.Start(t, perUserPerMethod)
	client := serve(t, limiter(t, tg.Addr).UnaryServerInterceptor())
	tg.Stop()
	for i := 0; i < 3; i++ {
		if _, err := check(client, "alice"); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
}

// Limit(ctx) is go-grpc-middleware v2's ratelimit.Limiter: here it is
// called from a plain interceptor, where the method comes from the context.
func TestLimitReadsTheMethodFromTheServerContext(t *testing.T) {
	tg := tollgatetest.Start(t, perUserPerMethod)
	var l interface{ Limit(context.Context) error } = limiter(t, tg.Addr)
	client := serve(t, func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if err := l.Limit(ctx); err != nil {
			return nil, err
		}
		return handler(ctx, req)
	})
	for i := 0; i < 2; i++ {
		if _, err := check(client, "alice"); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	if _, err := check(client, "alice"); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("third call: %v (the operation glob only matches if the method was read)", err)
	}
}

func TestAMissingRequiredIdentityIsInvalidArgument(t *testing.T) {
	tg := tollgatetest.Start(t, perUserPerMethod)
	c, err := tollgate.NewClient(tg.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	l, err := grpclimit.New(c, grpclimit.Config{
		Scope:    grpclimit.Static("api"),
		Identity: grpclimit.Required("x-user", grpclimit.Metadata("x-user")),
	})
	if err != nil {
		t.Fatal(err)
	}
	client := serve(t, l.UnaryServerInterceptor())
	if _, err := client.Check(context.Background(), &healthpb.HealthCheckRequest{}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("want INVALID_ARGUMENT, got %v", err)
	}
}

const oneASecondShaped = `
scopes:
  - name: api
    limits:
      - { name: per-user, per: identity, capacity: 1, refill_period: 1s, max_delay: 20s }
`

// Shaping: a call a limit admits for later runs after its delay, with
// ratelimit-delay metadata; one whose deadline is nearer than the delay is
// refused (the MaxWait asked with is cut to the deadline) and takes nothing.
func TestMaxWaitHoldsACallButNeverPastItsDeadline(t *testing.T) {
	tg := tollgatetest.Start(t, oneASecondShaped)
	c, err := tollgate.NewClient(tg.Addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	l, err := grpclimit.New(c, grpclimit.Config{
		Scope:    grpclimit.Static("api"),
		Identity: grpclimit.Metadata("x-user"),
		MaxWait:  20 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	client := serve(t, l.UnaryServerInterceptor())
	if _, err := check(client, "ann"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "x-user", "ann"), 500*time.Millisecond)
	defer cancel()
	_, err = client.Check(ctx, &healthpb.HealthCheckRequest{})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("behind a 0.5 s deadline, a 1 s wait: %v", err)
	}
	start := time.Now()
	header, err := check(client, "ann")
	held := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	got := header.Get("ratelimit-delay")
	if len(got) != 1 {
		t.Fatalf("ratelimit-delay: %v", got)
	}
	wait, err := strconv.ParseFloat(got[0], 64)
	if err != nil || wait <= 0.5 || wait > 1 || held < time.Duration(wait*float64(time.Second))-10*time.Millisecond {
		t.Fatalf("ratelimit-delay %v, held %v", got, held)
	}
}
