package exchange

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"

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
