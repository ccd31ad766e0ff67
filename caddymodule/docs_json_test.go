package caddymodule

import (
	"encoding/json"
	"net/http/httptest"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

const jsonExampleMarker = "<!-- json-config-example:"

// readmeJSONExample returns the README's JSON config example and the
// Caddyfile block it is the adapted form of (the last one before it).
func readmeJSONExample(t *testing.T) (caddyfileText, jsonText string) {
	t.Helper()
	data, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	before, after, ok := strings.Cut(string(data), jsonExampleMarker)
	if !ok {
		t.Fatal("the README has no JSON config example marker")
	}
	i := strings.LastIndex(before, "```caddyfile\n")
	if i < 0 {
		t.Fatal("no Caddyfile block before the JSON example")
	}
	caddyfileText, _, _ = strings.Cut(before[i+len("```caddyfile\n"):], "```")
	j := strings.Index(after, "```json\n")
	if j < 0 || strings.Count(after[:j], "\n") > 1 {
		t.Fatal("the marker is not right before a ```json block")
	}
	jsonText, _, _ = strings.Cut(after[j+len("```json\n"):], "```")
	return caddyfileText, jsonText
}

// foldSubroutes folds what `caddy adapt` nests: a route whose only handler
// is a subroute of one matcher-less route takes that route's handlers.
func foldSubroutes(v any) any {
	switch v := v.(type) {
	case map[string]any:
		for k, e := range v {
			v[k] = foldSubroutes(e)
		}
		handle, _ := v["handle"].([]any)
		if len(handle) != 1 {
			return v
		}
		sub, _ := handle[0].(map[string]any)
		routes, _ := sub["routes"].([]any)
		if sub["handler"] != "subroute" || len(routes) != 1 || len(sub) != 2 {
			return v
		}
		inner, _ := routes[0].(map[string]any)
		if _, matched := inner["match"]; matched || len(inner) != 1 {
			return v
		}
		v["handle"] = inner["handle"]
		return v
	case []any:
		for i, e := range v {
			v[i] = foldSubroutes(e)
		}
	}
	return v
}

// TestDocsJSONConfigExample: the README's JSON example loads (caddy.Validate
// provisions every app of it, ours included), is the adapted Caddyfile
// next to it (subroutes folded), and routes /orders/* through
// token_exchange.
func TestDocsJSONConfigExample(t *testing.T) {
	caddyfileText, jsonText := readmeJSONExample(t)
	var cfg caddy.Config
	dec := json.NewDecoder(strings.NewReader(jsonText))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		t.Fatalf("the README's JSON example does not parse: %v", err)
	}
	if err := caddy.Validate(&cfg); err != nil {
		t.Fatalf("the README's JSON example does not load: %v", err)
	}

	adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfileText), map[string]any{"filename": "Caddyfile"})
	if err != nil || len(warnings) > 0 {
		t.Fatalf("adapting the Caddyfile next to it: %v %v", err, warnings)
	}
	var want, got any
	if err := json.Unmarshal(adapted, &want); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(jsonText), &got); err != nil {
		t.Fatal(err)
	}
	if want = foldSubroutes(want); !reflect.DeepEqual(got, want) {
		folded, _ := json.MarshalIndent(want, "", "  ")
		t.Fatalf("the README's JSON is not the adapted Caddyfile; adapted and folded:\n%s", folded)
	}

	r := httptest.NewRequest("GET", "http://api.example.com/orders/1", nil)
	raw, _, err := findRouteHandler([]byte(jsonText), r)
	if err != nil || !strings.Contains(string(raw), "https://orders.internal") {
		t.Fatalf("no token_exchange handler for /orders/1: %v", err)
	}
}

// TestDocsOpening: the README opens with the problem and a 60-second path
// before any other section, and the path's `explain` line, run as written
// with the path's demo token, says the exchange would succeed.
func TestDocsOpening(t *testing.T) {
	data, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	opening, _, _ := strings.Cut(string(data), "\n## ")
	for _, want := range []string{"**The problem.**", "**In 60 seconds**", "token-exchange mint", "curl -s http://localhost:8080/api/orders/42"} {
		if !strings.Contains(opening, want) {
			t.Errorf("the README's opening lacks %q", want)
		}
	}
	var line string
	for _, l := range strings.Split(opening, "\n") {
		if strings.Contains(l, "token-exchange explain") {
			line = l
		}
	}
	fields := strings.Fields(line)
	o := explainOptions{method: "GET"}
	for i := 0; i+1 < len(fields); i++ {
		switch v := fields[i+1]; fields[i] {
		case "--config":
			o.config = v
		case "--route":
			o.route = v
		case "--host":
			o.host = v
		case "--token":
			if v != `"$TOKEN"` {
				t.Fatalf("the explain line passes %s, not the minted $TOKEN", v)
			}
		}
	}
	if o.config != "Caddyfile.example" || o.route == "" {
		t.Fatalf("no explain line against Caddyfile.example in the opening: %q", line)
	}
	t.Chdir("..")
	o.token = demoToken(t, map[string]any{"scope": "orders.read profile", "email": "alice@example.com", "client_id": "web-app"})
	var out strings.Builder
	if code, err := runExplain(t.Context(), o, &out); code != explainOK || err != nil {
		t.Fatalf("the opening's explain line: exit %d, %v\n%s", code, err, out.String())
	}
}
