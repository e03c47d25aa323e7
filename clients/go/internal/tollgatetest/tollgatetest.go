// Package tollgatetest starts the real tollgate binary for tests: a temp
// YAML config, a free 127.0.0.1 port, and a wait until gRPC health says
// SERVING. The binary's path comes from TOLLGATE_BIN; tests fail with a
// message saying so when it is unset.
package tollgatetest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// BinEnv names the environment variable holding the tollgate binary.
const BinEnv = "TOLLGATE_BIN"

// Bin returns the tollgate binary's path, or fails the test saying how to
// provide one.
func Bin(t testing.TB) string {
	t.Helper()
	bin := os.Getenv(BinEnv)
	if bin == "" {
		t.Fatalf("%s is not set: these tests start the real tollgate binary. "+
			"Build it (cargo build) and run `%s=/path/to/target/debug/tollgate go test ./...`, "+
			"or run scripts/test-go.sh /path/to/tollgate", BinEnv, BinEnv)
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%s=%s: %v", BinEnv, bin, err)
	}
	return bin
}

// Server is one running tollgate process.
type Server struct {
	// Addr is the host:port it serves gRPC on.
	Addr string

	bin    string
	config string // path of the YAML file
	mu     sync.Mutex
	cmd    *exec.Cmd
	done   chan struct{}
	log    *syncBuffer
}

// Start serves scopesYAML (the `scopes:` list and any other top-level keys,
// without `listen`) on a free port, and stops the process when the test
// ends.
func Start(t testing.TB, scopesYAML string) *Server {
	t.Helper()
	s, err := Launch(Bin(t), t.TempDir(), scopesYAML)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// Launch is Start outside a test: it writes the config into dir, and the
// caller stops the server. It retries with another port if the one it
// picked was taken in the meantime.
func Launch(bin, dir, scopesYAML string) (*Server, error) {
	s := &Server{bin: bin, config: filepath.Join(dir, "tollgate.yaml")}
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		addr, err := FreeAddr()
		if err != nil {
			return nil, fmt.Errorf("finding a free port: %w", err)
		}
		yaml := fmt.Sprintf("listen: %s\nlog:\n  level: warn\n%s", addr, scopesYAML)
		if err := os.WriteFile(s.config, []byte(yaml), 0o600); err != nil {
			return nil, err
		}
		s.Addr = addr
		if lastErr = s.start(); lastErr == nil {
			return s, nil
		}
	}
	return nil, fmt.Errorf("tollgate did not start: %w", lastErr)
}

// FreeAddr finds a free 127.0.0.1 port by binding :0 and closing it. The port
// can be taken again before it is used; callers retry.
func FreeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := l.Addr().String()
	return addr, l.Close()
}

func (s *Server) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	cmd := exec.Command(s.bin, "serve", "--config", s.config)
	cmd.Env = serverEnv()
	log := &syncBuffer{}
	cmd.Stdout = log
	cmd.Stderr = log
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	if err := waitServing(s.Addr, done, 10*time.Second); err != nil {
		_ = cmd.Process.Kill()
		<-done
		return fmt.Errorf("%w; its output:\n%s", err, log.String())
	}
	s.cmd, s.done, s.log = cmd, done, log
	return nil
}

// waitServing polls gRPC health until SERVING, the process exits, or the
// timeout passes.
func waitServing(addr string, exited <-chan struct{}, timeout time.Duration) error {
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// The first attempts are refused until the port is bound; grpc-go's
		// default backoff would then wait a whole second.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 10 * time.Millisecond, Multiplier: 1.2, MaxDelay: 50 * time.Millisecond},
			MinConnectTimeout: time.Second,
		}))
	if err != nil {
		return err
	}
	defer conn.Close()
	health := healthpb.NewHealthClient(conn)
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return fmt.Errorf("tollgate exited before serving on %s", addr)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		resp, err := health.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("tollgate not SERVING on %s after %s", addr, timeout)
}

// serverEnv is this process's environment without TOLLGATE_* variables:
// tollgate reads every one as a config override and refuses unknown ones,
// TOLLGATE_BIN included.
func serverEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "TOLLGATE_") {
			env = append(env, kv)
		}
	}
	return env
}

// Stop kills the process (a crash, as far as clients can tell) and waits
// for it. Stopping a stopped server does nothing.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGKILL)
	<-s.done
	s.cmd = nil
}

// Restart starts the process again on the same port and config.
func (s *Server) Restart() error {
	s.Stop()
	var err error
	// The old socket can linger for a moment after the kill.
	for attempt := 0; attempt < 20; attempt++ {
		if err = s.start(); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("restarting tollgate on %s: %w", s.Addr, err)
}

// Log returns what the process printed so far, for failure messages.
func (s *Server) Log() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.log == nil {
		return ""
	}
	return s.log.String()
}

// syncBuffer collects a process's output, written by exec's copying
// goroutine and read by the test.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
