package exchange

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"unicode/utf8"

	"github.com/valyala/fastjson"
)

// decodeJSONObject decodes a JOSE header or claims set into the values
// json.Unmarshal into a map[string]any would give (string, float64, bool,
// nil, []any, map[string]any), at a fraction of its cost: on every cache
// miss it is the largest piece of work outside the crypto.
//
// The input must have passed checkStrictJSON (UTF-8, no duplicate member,
// bounded depth). json.Valid then holds it to strict RFC 8259 syntax before
// fastjson (already in the build through jwx) reads it, because fastjson
// alone is lenient (it reads NaN and Inf, for one). Input with any escape
// goes to encoding/json itself: the two unescape lone surrogates
// differently, and one token must mean one thing. FuzzDecodeJSONObject
// checks that both paths agree with json.Unmarshal.
func decodeJSONObject(b []byte) (map[string]any, error) {
	if bytes.IndexByte(b, '\\') >= 0 {
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			return nil, err
		}
		if m == nil {
			return nil, errors.New("not a JSON object")
		}
		return m, nil
	}
	if !json.Valid(b) {
		return nil, errors.New("not valid JSON")
	}
	p := jsonParsers.Get()
	defer jsonParsers.Put(p)
	v, err := p.ParseBytes(b)
	if err != nil {
		return nil, err
	}
	if v.Type() != fastjson.TypeObject {
		return nil, errors.New("not a JSON object")
	}
	out, err := jsonValue(v)
	if err != nil {
		return nil, err
	}
	return out.(map[string]any), nil
}

var jsonParsers fastjson.ParserPool

// jsonValue copies a parsed value out of the parser's memory (which is
// reused) into Go values.
func jsonValue(v *fastjson.Value) (any, error) {
	switch v.Type() {
	case fastjson.TypeObject:
		o, _ := v.Object()
		m := make(map[string]any, o.Len())
		var err error
		o.Visit(func(key []byte, val *fastjson.Value) {
			if err != nil {
				return
			}
			var x any
			if x, err = jsonValue(val); err == nil {
				m[string(key)] = x
			}
		})
		return m, err
	case fastjson.TypeArray:
		items, _ := v.Array()
		a := make([]any, len(items))
		for i, item := range items {
			x, err := jsonValue(item)
			if err != nil {
				return nil, err
			}
			a[i] = x
		}
		return a, nil
	case fastjson.TypeString:
		s, _ := v.StringBytes()
		return string(s), nil
	case fastjson.TypeNumber:
		f, err := v.Float64()
		if err == nil && math.IsInf(f, 0) {
			// JSON has no infinity: this is a number beyond float64,
			// which json.Unmarshal refuses too.
			err = errors.New("out of range")
		}
		if err != nil {
			return nil, fmt.Errorf("number %s: %w", v, err)
		}
		return f, nil
	case fastjson.TypeTrue:
		return true, nil
	case fastjson.TypeFalse:
		return false, nil
	case fastjson.TypeNull:
		return nil, nil
	}
	return nil, fmt.Errorf("unexpected JSON value type %s", v.Type())
}

// appendJSONString appends s as a JSON string the way encoding/json writes
// it, without its HTML escaping (<, >, & stay as they are): control
// characters escaped, invalid UTF-8 as U+FFFD, U+2028 and U+2029 escaped.
func appendJSONString(b []byte, s string) []byte {
	const hexDigits = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// appendJSONArray appends a as a JSON array, each item through item; nil
// is null, as encoding/json writes a nil slice.
func appendJSONArray[V any](b []byte, a []V, item func([]byte, V) ([]byte, error)) ([]byte, error) {
	if a == nil {
		return append(b, "null"...), nil
	}
	b = append(b, '[')
	for i, v := range a {
		if i > 0 {
			b = append(b, ',')
		}
		var err error
		if b, err = item(b, v); err != nil {
			return nil, err
		}
	}
	return append(b, ']'), nil
}

func appendJSONStringItem(b []byte, s string) ([]byte, error) { return appendJSONString(b, s), nil }

// sortedKeys are m's keys in order, in one allocation (slices.Sorted of
// maps.Keys grows its slice as it goes: this runs on every mint).
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// appendJSONObject appends m as a JSON object, members sorted by name.
func appendJSONObject[V any](b []byte, m map[string]V) ([]byte, error) {
	b = append(b, '{')
	for i, name := range sortedKeys(m) {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendJSONString(b, name)
		b = append(b, ':')
		var err error
		if b, err = appendJSONValue(b, any(m[name])); err != nil {
			return nil, err
		}
	}
	return append(b, '}'), nil
}

// appendJSONValue appends v as JSON: strings, arrays, objects (members
// sorted, as encoding/json sorts map keys), booleans and null directly,
// anything else (numbers, other types) through encoding/json.
func appendJSONValue(b []byte, v any) ([]byte, error) {
	switch v := v.(type) {
	case string:
		return appendJSONString(b, v), nil
	case map[string]any:
		return appendJSONObject(b, v)
	case map[string]string:
		return appendJSONObject(b, v)
	case []string:
		return appendJSONArray(b, v, appendJSONStringItem)
	case []any:
		return appendJSONArray(b, v, appendJSONValue)
	case bool:
		return strconv.AppendBool(b, v), nil
	case nil:
		return append(b, "null"...), nil
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // as appendJSONString writes strings
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return append(b, bytes.TrimSuffix(buf.Bytes(), []byte("\n"))...), nil
}
