package mcp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"unicode/utf8"
)

// ParseErrorCode is the JSON-RPC code of a body refused as unreadable.
const ParseErrorCode = -32700

// MaxDepth is the deepest nesting of arrays and objects a body may have:
// serde_json's limit, which the Rust client's reading has.
const MaxDepth = 127

// envelopeKeys are the keys of a JSON-RPC message, and paramKeys the keys
// of params that name what a call touches. A key that differs from one of
// them only in case is refused: a server that matches keys without regard
// to case (as Go's encoding/json does for struct fields) would read it as
// that key, and the charge would be for something else than what runs.
var (
	envelopeKeys = []string{"jsonrpc", "id", "method", "params", "result", "error"}
	paramKeys    = []string{"name", "uri"}
)

// ParseError is why a body is refused rather than charged: it could be read
// in more than one way, so whatever Tollgate charged, a lenient MCP server
// might run something else. The middleware answers it with HTTP 400 and a
// JSON-RPC parse error ([ParseError.Body]), charges nothing and forwards
// nothing.
type ParseError struct {
	Reason string
}

func (e *ParseError) Error() string { return "mcp: the body is refused: " + e.Reason }

// Body is the JSON-RPC error that answers the refusal.
func (e *ParseError) Body() []byte {
	out, err := json.Marshal(map[string]any{
		"jsonrpc": "2.0",
		"id":      nil,
		"error": map[string]any{
			"code":    ParseErrorCode,
			"message": "Parse error",
			"data":    map[string]string{"reason": e.Reason},
		},
	})
	if err != nil {
		// Only strings and ints: cannot fail.
		return []byte(`{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}`)
	}
	return out
}

func refuse(format string, args ...any) *ParseError {
	return &ParseError{Reason: fmt.Sprintf(format, args...)}
}

// strict checks that body has exactly one reading: one JSON text in UTF-8
// without a byte order mark, no duplicate key in any object, no lone
// surrogate, no number out of a float64's range, nesting within MaxDepth,
// and no case variant of a JSON-RPC key beside or instead of it.
func strict(body []byte) error {
	switch {
	case bytes.HasPrefix(body, []byte{0xEF, 0xBB, 0xBF}):
		return refuse("the body starts with a byte order mark")
	case bytes.HasPrefix(body, []byte{0xFE, 0xFF}), bytes.HasPrefix(body, []byte{0xFF, 0xFE}):
		return refuse("the body is UTF-16, not UTF-8")
	case !utf8.Valid(body):
		return refuse("the body is not UTF-8")
	case !json.Valid(body):
		return refuse("the body is not one JSON text")
	case loneSurrogate(body):
		return refuse("the body holds a lone surrogate escape")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := walk(dec, 0); err != nil {
		var pe *ParseError
		if errors.As(err, &pe) {
			return pe
		}
		return refuse("%v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return refuse("the body is not one JSON text")
	}
	return nil
}

// walk reads one value, refusing duplicate keys, numbers Go cannot hold
// (the decoder fails on them) and nesting past MaxDepth.
func walk(dec *json.Decoder, depth int) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	delim, ok := tok.(json.Delim)
	if !ok {
		return nil
	}
	if depth+1 > MaxDepth {
		return refuse("the body nests deeper than %d", MaxDepth)
	}
	seen := map[string]bool{}
	for dec.More() {
		if delim == '{' {
			k, err := dec.Token()
			if err != nil {
				return err
			}
			key, _ := k.(string)
			if seen[key] {
				return refuse("the key %s appears twice in one object", quoteShort(key))
			}
			seen[key] = true
		}
		if err := walk(dec, depth+1); err != nil {
			return err
		}
	}
	_, err = dec.Token() // the closing delimiter
	return err
}

// caseVariant is the key of names that key differs from only in case
// (Unicode simple folding, as strings.EqualFold), or "".
func caseVariant(key string, names []string) string {
	for _, n := range names {
		if key != n && strings.EqualFold(key, n) {
			return n
		}
	}
	return ""
}

// checkMessage refuses case variants of the envelope keys in a message,
// and of name and uri in its params.
func checkMessage(msg map[string]json.RawMessage) error {
	for key := range msg {
		if n := caseVariant(key, envelopeKeys); n != "" {
			return refuse("the key %s is %q in another case", quoteShort(key), n)
		}
	}
	var params map[string]json.RawMessage
	if json.Unmarshal(msg["params"], &params) == nil {
		for key := range params {
			if n := caseVariant(key, paramKeys); n != "" {
				return refuse("the params key %s is %q in another case", quoteShort(key), n)
			}
		}
	}
	return nil
}

// loneSurrogate reports whether a string of body, which is valid JSON,
// holds a \u escape of a UTF-16 surrogate that is not half of a pair. Go's
// decoder would read it as U+FFFD and others keep it, so it is refused.
func loneSurrogate(body []byte) bool {
	inString := false
	for i := 0; i < len(body); i++ {
		c := body[i]
		if !inString {
			inString = c == '"'
			continue
		}
		switch c {
		case '"':
			inString = false
		case '\\':
			if i+1 < len(body) && body[i+1] == 'u' {
				r, ok := hex4(body, i+2)
				switch {
				case !ok:
				case r >= 0xD800 && r <= 0xDBFF:
					next, ok := rune(0), i+7 < len(body) && body[i+6] == '\\' && body[i+7] == 'u'
					if ok {
						next, ok = hex4(body, i+8)
					}
					if !ok || next < 0xDC00 || next > 0xDFFF {
						return true
					}
					i += 11
					continue
				case r >= 0xDC00 && r <= 0xDFFF:
					return true
				}
				i += 5
				continue
			}
			i++ // the escaped character
		}
	}
	return false
}

func hex4(b []byte, at int) (rune, bool) {
	if at+4 > len(b) {
		return 0, false
	}
	var r rune
	for _, c := range b[at : at+4] {
		switch {
		case c >= '0' && c <= '9':
			r = r<<4 | rune(c-'0')
		case c >= 'a' && c <= 'f':
			r = r<<4 | rune(c-'a'+10)
		case c >= 'A' && c <= 'F':
			r = r<<4 | rune(c-'A'+10)
		default:
			return 0, false
		}
	}
	return r, true
}

func quoteShort(s string) string {
	const most = 64
	if len(s) > most {
		cut := most
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut] + "…"
	}
	return fmt.Sprintf("%q", s)
}

// PathMatches reports whether a request path is the MCP endpoint: both are
// compared after cleaning (repeated slashes collapsed, . and .. resolved, a
// trailing slash dropped) and in ASCII lower case, since servers and
// routers that normalise paths would hand /mcp/, //mcp or /MCP to the MCP
// handler. path is the decoded path (net/http's URL.Path).
func PathMatches(endpoint, requestPath string) bool {
	return normalizePath(endpoint) == normalizePath(requestPath)
}

func normalizePath(p string) string {
	p = path.Clean("/" + p)
	b := []byte(p)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + ('a' - 'A')
		}
	}
	return string(b)
}
