package exchange

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"reflect"
	"slices"
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

// referenceMarshal is how the claims were serialized before marshal wrote
// them itself: encoding/json (without HTML escaping), extra claims appended
// in name order.
func referenceMarshal(t *testing.T, c *mintedClaims, extra map[string]any) []byte {
	t.Helper()
	enc := func(v any) []byte {
		var buf bytes.Buffer
		e := json.NewEncoder(&buf)
		e.SetEscapeHTML(false)
		if err := e.Encode(v); err != nil {
			t.Fatal(err)
		}
		return bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
	}
	b := enc(c)
	if len(extra) == 0 {
		return b
	}
	names := slices.Sorted(maps.Keys(extra))
	b = b[:len(b)-1]
	for _, name := range names {
		b = append(append(append(append(b, ','), enc(name)...), ':'), enc(extra[name])...)
	}
	return append(b, '}')
}

func FuzzMintedClaimsMarshal(f *testing.F) {
	f.Add("alice", "web", "orders.read", "a@example.com", "upstream", true)
	f.Add("<script>&\u2028\u2029\x00\x1f\"\\", "", "", "\xff\xfe", "\t\n\r", false)
	f.Add("é😀", "c\u007f", "s", "", "", true)
	f.Fuzz(func(t *testing.T, sub, clientID, scope, email, prior string, withAct bool) {
		c := &mintedClaims{Iss: "https://gateway.test", Sub: sub, Aud: []string{"https://a", sub}, Exp: 1767225600, Iat: -5, Nbf: 0,
			Jti: "j", Scope: scope, ClientID: clientID}
		if withAct {
			c.Act = nestAct(Actor{Subject: "https://gateway.test", ClientID: clientID}, map[string]any{"sub": prior, "n": 1.5, "l": []any{true, nil, prior}})
			c.Cnf = map[string]string{"jkt": sub, "x5t#S256": scope}
		}
		extra := map[string]any{"email": email, prior: map[string]any{"x": []any{1e21, math.Copysign(0, -1), email}},
			"nil_any": []any(nil), "nil_strings": []string(nil), "strings": []string{email, sub}, "empty": []any{}}
		got, err := c.marshal(extra)
		if err != nil {
			t.Fatal(err)
		}
		if want := referenceMarshal(t, c, extra); !bytes.Equal(got, want) {
			t.Fatalf("marshal:\n got %s\nwant %s", got, want)
		}
	})
}

func TestHeaderMemo(t *testing.T) {
	var m headerMemo
	if _, ok := m.get("eyJhbGciOiJFUzI1NiJ9"); ok {
		t.Fatal("an empty memo knows a header")
	}
	want := jwsHeader{Alg: "ES256", Kid: "k1", Typ: "JWT"}
	m.remember("eyJhbGciOiJFUzI1NiJ9.payload.sig", want)
	if got, ok := m.get("eyJhbGciOiJFUzI1NiJ9"); !ok || got != want {
		t.Fatalf("get = %+v, %v; want %+v", got, ok, want)
	}
	for i := range maxRememberedHeaders + 1 {
		m.remember(fmt.Sprintf("h%d.p.s", i), want)
	}
	if n := len(*m.headers.Load()); n > maxRememberedHeaders {
		t.Fatalf("memo holds %d headers, bound %d", n, maxRememberedHeaders)
	}
	if _, ok := m.get(fmt.Sprintf("h%d", maxRememberedHeaders)); !ok {
		t.Fatal("the newest header was not remembered after the memo started over")
	}
}
