package mcp

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

func TestOperationsNameTheToolPromptOrResource(t *testing.T) {
	params := json.RawMessage(`{"name":"search","uri":"file:///a"}`)
	for method, want := range map[string]string{
		"tools/call":     "tools/call:search",
		"prompts/get":    "prompts/get:search",
		"resources/read": "resources/read:file:///a",
		"tools/list":     "tools/list",
	} {
		if got := Operation(method, params); got != want {
			t.Errorf("Operation(%s) = %q, want %q", method, got, want)
		}
	}
	if got := Operation("tools/call", nil); got != "tools/call:" {
		t.Errorf("no params: %q", got)
	}
}

func TestLongOperationsAreCutAtACharacterBoundary(t *testing.T) {
	uri := "file:///" + strings.Repeat("é", 200)
	got := Operation("resources/read", json.RawMessage(`{"uri":"`+uri+`"}`))
	if len(got) > 256 || !utf8.ValidString(got) || !strings.HasPrefix("resources/read:"+uri, got) {
		t.Fatalf("got %d bytes, valid UTF-8 %v", len(got), utf8.ValidString(got))
	}
}

func TestNotificationsAndResponsesAreFreeButIdLessCallsAreNot(t *testing.T) {
	body, _ := Parse([]byte(`[
		{"jsonrpc":"2.0","method":"notifications/initialized"},
		{"jsonrpc":"2.0","id":1,"result":{}},
		{"jsonrpc":"2.0","id":2,"error":{"code":1,"message":"x"}},
		{"jsonrpc":"2.0","id":"a","method":"ping"},
		{"jsonrpc":"2.0","method":"tools/call","params":{"name":"fetch"}},
		{"jsonrpc":"2.0","id":3,"method":7},
		42
	]`))
	if !body.JSONRPC || !body.Batch || len(body.Calls) != 4 {
		t.Fatalf("got %+v", body)
	}
	want := []Call{
		{ID: json.RawMessage(`"a"`), Operation: "ping"},
		{Operation: "tools/call:fetch"},
		{ID: json.RawMessage(`3`), Plain: true},
		{Plain: true},
	}
	for i, c := range body.Calls {
		if string(c.ID) != string(want[i].ID) || c.Operation != want[i].Operation || c.Plain != want[i].Plain {
			t.Errorf("call %d: got %+v, want %+v", i, c, want[i])
		}
	}
	single, _ := Parse([]byte(`{"jsonrpc":"2.0","method":"notifications/cancelled"}`))
	if !single.JSONRPC || single.Batch || len(single.Calls) != 0 {
		t.Fatalf("a lone notification: %+v", single)
	}
}

func TestJSONThatIsNotJSONRPCIsChargedAsAPlainRequest(t *testing.T) {
	for _, b := range []string{"[]", `"a string"`, "42", "null"} {
		if got, err := Parse([]byte(b)); err != nil || got.JSONRPC {
			t.Errorf("%q: %+v, %v", b, got, err)
		}
	}
}

func TestBodiesThatAreNotJSONAreRefusedWithAParseError(t *testing.T) {
	for _, b := range []string{"", "not json", "{broken", "[1,"} {
		_, err := Parse([]byte(b))
		var pe *ParseError
		if !errors.As(err, &pe) {
			t.Fatalf("%q: %v", b, err)
		}
		var rpc struct {
			ID    json.RawMessage `json:"id"`
			Error struct {
				Code int `json:"code"`
			} `json:"error"`
		}
		if json.Unmarshal(pe.Body(), &rpc) != nil || rpc.Error.Code != -32700 || string(rpc.ID) != "null" {
			t.Fatalf("%q: %s", b, pe.Body())
		}
	}
}

func TestABatchIsChargedOncePerOperationWithTheCallsAsCost(t *testing.T) {
	body := Body{JSONRPC: true, Batch: true, Calls: []Call{
		{Operation: "tools/call:search"},
		{Operation: "tools/call:fetch"},
		{Operation: "tools/call:search"},
		{Plain: true},
	}}
	got := body.Requests(tollgate.Request{Scope: "s", Identity: "i", Operation: "POST /mcp", Cost: 2})
	want := []tollgate.Request{
		{Scope: "s", Identity: "i", Operation: "tools/call:search", Cost: 4},
		{Scope: "s", Identity: "i", Operation: "tools/call:fetch", Cost: 2},
		{Scope: "s", Identity: "i", Operation: "POST /mcp", Cost: 2},
	}
	if len(got) != len(want) {
		t.Fatalf("got %+v", got)
	}
	for i := range want {
		if got[i].Operation != want[i].Operation || got[i].Cost != want[i].Cost || got[i].Identity != "i" {
			t.Errorf("request %d: got %+v, want %+v", i, got[i], want[i])
		}
	}
}

func TestADenialIsAJSONRPCErrorWithTheWaitInData(t *testing.T) {
	ds := []tollgate.Decision{{Allowed: false, RetryAfter: 2100 * time.Millisecond, Rule: "per-user",
		Buckets: []tollgate.Bucket{{Rule: "per-user", Exhausted: true}}}}
	out := Body{JSONRPC: true, Calls: []Call{{ID: json.RawMessage(`7`)}}}.Denial(ds)
	want := `{"jsonrpc":"2.0","id":7,"error":{"code":429,"message":"Rate limit exceeded",` +
		`"data":{"retryAfterSeconds":3,"retryAfterMs":2100,"violatedPolicies":["per-user"]}}}`
	if string(out) != want {
		t.Fatalf("got  %s\nwant %s", out, want)
	}
}

func TestABatchDenialAnswersEveryChargedCall(t *testing.T) {
	ds := []tollgate.Decision{{Allowed: false, Reason: "cost 3 exceeds the capacity 2", Rule: "r"}}
	body := Body{JSONRPC: true, Batch: true, Calls: []Call{{ID: json.RawMessage(`1`)}, {}}}
	var errs []struct {
		ID    json.RawMessage `json:"id"`
		Error struct {
			Data map[string]any `json:"data"`
		} `json:"error"`
	}
	if err := json.Unmarshal(body.Denial(ds), &errs); err != nil || len(errs) != 2 {
		t.Fatalf("%v: %+v", err, errs)
	}
	if string(errs[0].ID) != "1" || string(errs[1].ID) != "null" {
		t.Fatalf("ids: %s, %s", errs[0].ID, errs[1].ID)
	}
	if errs[0].Error.Data["reason"] != "cost 3 exceeds the capacity 2" || errs[0].Error.Data["retryAfterSeconds"] != nil {
		t.Fatalf("data: %v", errs[0].Error.Data)
	}
}
