package httplimit_test

import (
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"

	"github.com/tollgate-rs/tollgate/clients/go/httplimit"
	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

func Example() {
	client, err := tollgate.NewClient("127.0.0.1:50051")
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	limit, err := httplimit.New(client, httplimit.Config{
		Scope:     httplimit.Static("demo"),
		Identity:  httplimit.FirstOf(httplimit.Header("X-Api-Key"), httplimit.RemoteIP()),
		Operation: httplimit.MethodPath(), // "GET /v1/items": limits can glob on routes
	})
	if err != nil {
		log.Fatal(err)
	}
	api := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })
	log.Fatal(http.ListenAndServe("127.0.0.1:8080", limit(api)))
}

// An MCP server behind a reverse proxy: each JSON-RPC call is charged as
// tools/call:<name>, prompts/get:<name> or resources/read:<uri>.
func Example_mcp() {
	client, err := tollgate.NewClient("127.0.0.1:50051")
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	upstream, _ := url.Parse("http://127.0.0.1:3000")
	limit, err := httplimit.New(client, httplimit.Config{
		Scope:        httplimit.Static("github-mcp"),
		Identity:     httplimit.Required("X-User", httplimit.Header("X-User")),
		MCP:          true,
		MaxBodyBytes: 1 << 20, // a bigger body is a 413
	})
	if err != nil {
		log.Fatal(err)
	}
	log.Fatal(http.ListenAndServe("127.0.0.1:8080", limit(httputil.NewSingleHostReverseProxy(upstream))))
}
