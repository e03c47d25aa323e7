// A module of its own, so that go-grpc-middleware is a dependency of this
// test only and never of the client module its users import.
module github.com/tollgate-rs/tollgate/clients/go/internal/interop

go 1.26.0

require (
	github.com/grpc-ecosystem/go-grpc-middleware/v2 v2.3.4
	github.com/tollgate-rs/tollgate/clients/go v0.0.0
	google.golang.org/grpc v1.85.0
)

require (
	golang.org/x/net v0.60.0 // indirect
	golang.org/x/sys v0.48.0 // indirect
	golang.org/x/text v0.42.0 // indirect
	google.golang.org/genproto/googleapis/rpc v0.0.0-20260817212433-ac3dfec99bb1 // indirect
	google.golang.org/protobuf v1.36.12 // indirect
)

replace github.com/tollgate-rs/tollgate/clients/go => ../..
