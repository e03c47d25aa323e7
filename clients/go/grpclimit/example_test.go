package grpclimit_test

import (
	"log"

	"github.com/tollgate-rs/tollgate/clients/go/grpclimit"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
	"google.golang.org/grpc"
)

func Example() {
	client, err := tollgate.NewClient("127.0.0.1:50051")
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	limiter, err := grpclimit.New(client, grpclimit.Config{
		Scope:     grpclimit.Static("api"),
		Identity:  grpclimit.FirstOf(grpclimit.PeerCommonName(), grpclimit.Metadata("x-user")),
		Operation: grpclimit.FullMethod(), // "/pkg.Service/Method"
	})
	if err != nil {
		log.Fatal(err)
	}
	// Or, with go-grpc-middleware v2: ratelimit.UnaryServerInterceptor(limiter).
	server := grpc.NewServer(grpc.UnaryInterceptor(limiter.UnaryServerInterceptor()))
	_ = server // register services, then server.Serve(listener)
}
