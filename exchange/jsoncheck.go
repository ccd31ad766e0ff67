package exchange

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"unicode/utf8"
)

// checkStrictJSON refuses what encoding/json would silently accept in a JOSE
// header or claims set: invalid UTF-8 (which it replaces with U+FFFD) and
// duplicate member names (where it keeps the last, so two parsers can read
// two different tokens; RFC 7515 §5.2 and RFC 7519 §4 say reject). It also
// requires exactly one JSON value. It is a single pass without allocations
// for ordinary claims sets; full syntax is left to json.Unmarshal, which
// runs after it.
// maxJSONDepth bounds the nesting of a JOSE header or claims set, checked
// before the stack (and json.Unmarshal's recursion after it) grows with it.
// Real tokens nest a few levels (an act chain of max_act_depth 5 is 6).
const maxJSONDepth = 32

func checkStrictJSON(b []byte) error {
	if !utf8.Valid(b) {
		return errors.New("not valid UTF-8")
	}
	// The member names of the open objects share one slice: an object's
	// names are keys[start:] while it is the innermost open object, and are
	// dropped when it closes. Past 32 names an object switches to a set.
	type frame struct {
		isObj     bool
		expectKey bool
		start     int
		keySet    map[string]struct{}
	}
	var stackBuf [8]frame
	stack := stackBuf[:0]
	var keysBuf [48][]byte
	keys := keysBuf[:0]
	values := 0
	i := skipSpace(b, 0)
	for i < len(b) {
		if len(stack) == 0 {
			if values++; values > 1 {
				return errors.New("more than one JSON value")
			}
		}
		c := b[i]
		switch {
		case c == '{' || c == '[':
			if len(stack) == maxJSONDepth {
				return fmt.Errorf("JSON nested deeper than %d", maxJSONDepth)
			}
			stack = append(stack, frame{isObj: c == '{', expectKey: c == '{', start: len(keys)})
			i++
		case c == '}' || c == ']':
			if len(stack) == 0 || stack[len(stack)-1].isObj != (c == '}') {
				return errors.New("unbalanced JSON")
			}
			keys = keys[:stack[len(stack)-1].start]
			stack = stack[:len(stack)-1]
			i++
		case c == ',':
			if len(stack) > 0 && stack[len(stack)-1].isObj {
				stack[len(stack)-1].expectKey = true
			}
			i++
		case c == ':':
			i++
		case c == '"':
			end, escaped, err := scanString(b, i)
			if err != nil {
				return err
			}
			if top := len(stack) - 1; top >= 0 && stack[top].isObj && stack[top].expectKey {
				key := b[i+1 : end-1]
				if escaped {
					var s string
					if err := json.Unmarshal(b[i:end], &s); err != nil {
						return err
					}
					key = []byte(s)
				}
				f := &stack[top]
				if f.keySet == nil && len(keys)-f.start < 32 {
					for _, k := range keys[f.start:] {
						if bytes.Equal(k, key) {
							return fmt.Errorf("duplicate member %s", b[i:end])
						}
					}
					keys = append(keys, key)
				} else {
					if f.keySet == nil {
						f.keySet = make(map[string]struct{}, 64)
						for _, k := range keys[f.start:] {
							f.keySet[string(k)] = struct{}{}
						}
					}
					if _, dup := f.keySet[string(key)]; dup {
						return fmt.Errorf("duplicate member %s", b[i:end])
					}
					f.keySet[string(key)] = struct{}{}
				}
				f.expectKey = false
			}
			i = end
		default:
			// a literal or number: skip to the next structural character
			for i < len(b) && !isJSONDelimiter(b[i]) {
				i++
			}
		}
		i = skipSpace(b, i)
	}
	if len(stack) != 0 || values != 1 {
		return errors.New("not exactly one JSON value")
	}
	return nil
}

// scanString returns the index just past the string starting at b[i] (a
// quote), and whether it holds escapes.
func scanString(b []byte, i int) (int, bool, error) {
	escaped := false
	for j := i + 1; j < len(b); j++ {
		switch b[j] {
		case '\\':
			escaped = true
			j++
		case '"':
			return j + 1, escaped, nil
		}
	}
	return 0, false, errors.New("unterminated string")
}

func isJSONDelimiter(c byte) bool {
	switch c {
	case ' ', '\t', '\r', '\n', ',', ':', '[', ']', '{', '}', '"':
		return true
	}
	return false
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\r' || b[i] == '\n') {
		i++
	}
	return i
}
