package exchange

import (
	"encoding/json"
	"reflect"
	"testing"
)

// decodeJSONObject must read every strict JSON object exactly as
// json.Unmarshal into a map[string]any does, and refuse what it refuses.
func FuzzDecodeJSONObject(f *testing.F) {
	for _, seed := range []string{
		`{"iss":"https://idp.test","sub":"alice","aud":["a","b"],"exp":1767225600,"scope":"orders.read profile"}`,
		`{"act":{"sub":"svc","act":{"sub":"inner"}},"n":-0,"f":1.5e3,"big":1e400,"t":true,"x":null,"e":{},"a":[]}`,
		`{"u":"\u00e9\ud83d\ude00","lone":"\ud800","pair":"\ud800\u0041","slash":"https:\/\/idp"}`,
		`{"nan":NaN}`, `{"inf":Infinity}`, `{"lead":01}`, `[1,2]`, `null`, `{"a":1}{"b":2}`, `{"a":"é"}`,
		`{"num":123456789012345678901234567890}`, `{"neg":-1.0e-400}`, `{"tab":"a	b"}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if checkStrictJSON(b) != nil {
			return
		}
		got, gotErr := decodeJSONObject(b)
		var want map[string]any
		wantErr := json.Unmarshal(b, &want)
		if wantErr == nil && want == nil {
			wantErr = errNotObjectForTest
		}
		if (gotErr != nil) != (wantErr != nil) {
			t.Fatalf("%q: decodeJSONObject error %v, json.Unmarshal error %v", b, gotErr, wantErr)
		}
		if gotErr == nil && !reflect.DeepEqual(got, want) {
			t.Fatalf("%q: decodeJSONObject = %#v, json.Unmarshal = %#v", b, got, want)
		}
	})
}

var errNotObjectForTest = json.Unmarshal([]byte(`1`), &map[string]any{})

func TestDecodeJSONObjectTypes(t *testing.T) {
	got, err := decodeJSONObject([]byte(`{"s":"x","n":2,"b":false,"z":null,"a":[1,"y"],"o":{"k":true}}`))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"s": "x", "n": 2.0, "b": false, "z": nil, "a": []any{1.0, "y"}, "o": map[string]any{"k": true}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %#v, want %#v", got, want)
	}
	for _, bad := range []string{`{"nan":NaN}`, `{"inf":Infinity}`, `{"x":01}`, `[]`, `null`, `{"big":1e400}`, `{"a":1,}`} {
		if _, err := decodeJSONObject([]byte(bad)); err == nil {
			t.Errorf("%s: accepted", bad)
		}
	}
}
