package mcp

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"slices"
	"strconv"
	"testing"

	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

// mcpVectorsPath is the file the Rust client checks too, from this
// package's directory (where go test runs).
const mcpVectorsPath = "../../mcp/vectors.json"

type mcpVectors struct {
	About  []string `json:"about"`
	Bodies []struct {
		Name    string   `json:"name"`
		Why     string   `json:"why"`
		Body    *string  `json:"body"`
		BodyHex *string  `json:"body_hex"`
		Refused bool     `json:"refused"`
		Charges [][2]any `json:"charges"`
	} `json:"bodies"`
	Paths []struct {
		Endpoint string `json:"endpoint"`
		Path     string `json:"path"`
		MCP      bool   `json:"mcp"`
	} `json:"paths"`
}

func loadMCPVectors(t *testing.T) mcpVectors {
	t.Helper()
	raw, err := os.ReadFile(mcpVectorsPath)
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	dec.UseNumber()
	var v mcpVectors
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("%s: %v", mcpVectorsPath, err)
	}
	if len(v.Bodies) == 0 || len(v.Paths) == 0 {
		t.Fatalf("%s holds no vectors", mcpVectorsPath)
	}
	return v
}

// charges is what the middleware would charge for body, as sorted
// "operation=cost" strings, the shape of the vectors' charges.
func charges(b Body) []string {
	base := tollgate.Request{Operation: "POST /mcp"}
	reqs := []tollgate.Request{base}
	if b.JSONRPC {
		reqs = b.Requests(base)
	}
	out := []string{}
	for _, r := range reqs {
		cost := r.Cost
		if cost == 0 {
			cost = 1
		}
		out = append(out, r.Operation+"="+strconv.FormatUint(uint64(cost), 10))
	}
	slices.Sort(out)
	return out
}

func TestBodiesAreChargedOrRefusedAsTheSharedVectorsSay(t *testing.T) {
	for _, v := range loadMCPVectors(t).Bodies {
		var body []byte
		switch {
		case v.Body != nil && v.BodyHex == nil:
			body = []byte(*v.Body)
		case v.BodyHex != nil && v.Body == nil:
			var err error
			if body, err = hex.DecodeString(*v.BodyHex); err != nil {
				t.Fatalf("%s: body_hex: %v", v.Name, err)
			}
		default:
			t.Fatalf("%s: give body or body_hex", v.Name)
		}
		got, err := Parse(body)
		if v.Refused {
			if err == nil {
				t.Errorf("%s: accepted, charged %v; want refused", v.Name, charges(got))
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: refused (%v); want charged %v", v.Name, err, v.Charges)
			continue
		}
		want := []string{}
		for _, c := range v.Charges {
			want = append(want, fmt.Sprint(c[0])+"="+fmt.Sprint(c[1]))
		}
		slices.Sort(want)
		if g := charges(got); !slices.Equal(g, want) {
			t.Errorf("%s: charged %v, want %v", v.Name, g, want)
		}
	}
}

func TestPathsAreReadAsMCPAsTheSharedVectorsSay(t *testing.T) {
	for _, v := range loadMCPVectors(t).Paths {
		// net/http hands a handler the decoded path.
		decoded, err := url.PathUnescape(v.Path)
		if err != nil {
			t.Fatalf("%s: %v", v.Path, err)
		}
		if got := PathMatches(v.Endpoint, decoded); got != v.MCP {
			t.Errorf("PathMatches(%q, %q) = %v, want %v", v.Endpoint, v.Path, got, v.MCP)
		}
	}
}
