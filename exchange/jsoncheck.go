package exchange

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"
)

// checkStrictJSON refuses what encoding/json would silently accept in a JOSE
// header or claims set: invalid UTF-8 (which it replaces with U+FFFD) and
// duplicate member names (where it keeps the last, so two parsers can read
// two different tokens; RFC 7515 §5.2 and RFC 7519 §4 say reject).
func checkStrictJSON(b []byte) error {
	if !utf8.Valid(b) {
		return errors.New("not valid UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	type frame struct {
		keys    map[string]struct{}
		isObj   bool
		wantKey bool
	}
	var stack []frame
	values := 0
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			if len(stack) != 0 || values != 1 {
				return errors.New("not exactly one JSON value")
			}
			return nil
		}
		if err != nil {
			return err
		}
		if len(stack) == 0 {
			// a new top-level value begins
			if values++; values > 1 {
				return errors.New("more than one JSON value")
			}
		}
		top := len(stack) - 1
		switch t := tok.(type) {
		case json.Delim:
			switch t {
			case '{':
				if top >= 0 && stack[top].isObj {
					stack[top].wantKey = true
				}
				stack = append(stack, frame{keys: map[string]struct{}{}, isObj: true, wantKey: true})
			case '[':
				if top >= 0 && stack[top].isObj {
					stack[top].wantKey = true
				}
				stack = append(stack, frame{})
			case '}', ']':
				stack = stack[:top]
			}
		case string:
			if top >= 0 && stack[top].isObj && stack[top].wantKey {
				if _, dup := stack[top].keys[t]; dup {
					return fmt.Errorf("duplicate member %q", t)
				}
				stack[top].keys[t] = struct{}{}
				stack[top].wantKey = false
				continue
			}
			if top >= 0 && stack[top].isObj {
				stack[top].wantKey = true
			}
		default:
			if top >= 0 && stack[top].isObj {
				stack[top].wantKey = true
			}
		}
	}
}
