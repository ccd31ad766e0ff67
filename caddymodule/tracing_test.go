package caddymodule

import (
	"bytes"
	"compress/gzip"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracev1 "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// otlpReceiver is a real OTLP/HTTP trace receiver: it decodes what Caddy's
// exporter sends and keeps the raw bytes (scanned for leaked tokens).
type otlpReceiver struct {
	*httptest.Server
	mu    sync.Mutex
	spans []*tracev1.Span
	raw   bytes.Buffer
}

func newOTLPReceiver(t *testing.T) *otlpReceiver {
	o := &otlpReceiver{}
	o.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body io.Reader = r.Body
		if r.Header.Get("Content-Encoding") == "gzip" {
			zr, err := gzip.NewReader(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			body = zr
		}
		data, _ := io.ReadAll(body)
		var req collectortrace.ExportTraceServiceRequest
		if err := proto.Unmarshal(data, &req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		o.mu.Lock()
		o.raw.Write(data)
		for _, rs := range req.ResourceSpans {
			for _, ss := range rs.ScopeSpans {
				o.spans = append(o.spans, ss.Spans...)
			}
		}
		o.mu.Unlock()
		w.Header().Set("Content-Type", "application/x-protobuf")
		out, _ := proto.Marshal(&collectortrace.ExportTraceServiceResponse{})
		_, _ = w.Write(out)
	}))
	t.Cleanup(o.Close)
	return o
}

// waitSpans waits until n spans named name arrived.
func (o *otlpReceiver) waitSpans(t *testing.T, name string, n int) []*tracev1.Span {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		o.mu.Lock()
		var got []*tracev1.Span
		for _, s := range o.spans {
			if s.Name == name {
				got = append(got, s)
			}
		}
		o.mu.Unlock()
		if len(got) >= n {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d %q spans after 20s, want %d", len(got), name, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (o *otlpReceiver) spanByID(id []byte) *tracev1.Span {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, s := range o.spans {
		if bytes.Equal(s.SpanId, id) {
			return s
		}
	}
	return nil
}

func spanAttrs(s *tracev1.Span) map[string]string {
	m := map[string]string{}
	for _, kv := range s.Attributes {
		v := kv.Value
		switch {
		case v.GetStringValue() != "":
			m[kv.Key] = v.GetStringValue()
		case v.GetArrayValue() != nil:
			var parts []string
			for _, e := range v.GetArrayValue().Values {
				parts = append(parts, e.GetStringValue())
			}
			m[kv.Key] = strings.Join(parts, " ")
		default:
			m[kv.Key] = fmt.Sprint(v.GetIntValue())
		}
	}
	return m
}

// TestTracingSpanPerExchange: with Caddy's `tracing` directive, each
// exchange is a child span of the request's span, exported through Caddy's
// own OTLP exporter to a real receiver, with outcome, cache hit/miss,
// issuer and hashed sub; the upstream gets the request's traceparent; no
// raw token or sub is exported.
func TestTracingSpanPerExchange(t *testing.T) {
	otlp := newOTLPReceiver(t)
	t.Setenv("OTEL_TRACES_EXPORTER", "otlp")
	t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
	t.Setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", otlp.URL+"/v1/traces")
	t.Setenv("OTEL_BSP_SCHEDULE_DELAY", "100")

	idp := testidp.New(t, "https://idp.test")
	idp.Audience = "https://gateway.test"
	idp.AddKey("rsa-1", "RS256")
	upstream := newRecordingUpstream(t)
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	config := fmt.Sprintf(`{
%s	token_exchange {
		issuer %s
		trust https://idp.test {
			jwks_url %s
			audience https://gateway.test
			algorithms RS256
		}
		client billing-svc {
			secret_hash %s
			audience https://billing.internal
			scope billing.read
		}
	}
}
http://localhost:%d {
	tracing {
		span gateway
	}
	route /api/* {
		token_exchange {
			audience https://orders.internal
			scope orders.read
			require_scope orders.read
		}
		reverse_proxy %s
	}
	handle /oauth2/token {
		token_exchange_endpoint
	}
}
`, testGlobalOptions(logFile, t.TempDir()), gatewayIssuer, idp.JWKSURL(), bcryptHash(t, "s3cret-billing"), gatewayPort, strings.TrimPrefix(upstream.URL, "http://"))
	tester := caddytest.NewTester(t)
	tester.InitServer(config, "caddyfile")
	g := &gateway{tester: tester, idp: idp, upstream: upstream, logFile: logFile}

	good := idp.Token("rsa-1", testidp.Claims{"sub": "alice-7f3", "scope": "orders.read"})
	for i, want := range []int{200, 200} {
		if resp := g.get(t, "/api/orders/1", map[string]string{"Authorization": "Bearer " + good}); resp.StatusCode != want {
			t.Fatalf("request %d: status %d", i, resp.StatusCode)
		}
	}
	// the upstream got the request's traceparent (the gateway span's)
	tp := upstream.last().Header.Get("Traceparent")
	if len(tp) != 55 {
		t.Fatalf("upstream traceparent %q", tp)
	}
	noScope := idp.Token("rsa-1", testidp.Claims{"sub": "alice-7f3", "scope": "profile"})
	if resp := g.get(t, "/api/orders/1", map[string]string{"Authorization": "Bearer " + noScope}); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("no scope: status %d", resp.StatusCode)
	}

	// the token endpoint: a success and a client that fails to authenticate
	billing := idp.Token("rsa-1", testidp.Claims{"sub": "alice-7f3", "scope": "billing.read"})
	for _, tc := range []struct {
		secret string
		status int
	}{{"s3cret-billing", http.StatusOK}, {"wrong", http.StatusUnauthorized}} {
		form := url.Values{
			"grant_type":         {exchange.GrantTypeTokenExchange},
			"subject_token":      {billing},
			"subject_token_type": {exchange.TokenTypeAccessToken},
			"audience":           {"https://billing.internal"},
		}
		req, _ := http.NewRequest(http.MethodPost, fmt.Sprintf("http://localhost:%d/oauth2/token", gatewayPort), strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.SetBasicAuth("billing-svc", tc.secret)
		resp, err := tester.Client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != tc.status {
			t.Fatalf("token endpoint with secret %q: status %d", tc.secret, resp.StatusCode)
		}
	}

	spans := otlp.waitSpans(t, "token_exchange", 5)
	subHash := exchange.HashToken("alice-7f3")
	var outcomes, caches []string
	for i, s := range spans {
		a := spanAttrs(s)
		outcomes = append(outcomes, a["token_exchange.outcome"])
		caches = append(caches, a["token_exchange.cache"])
		route, issuer := "https://orders.internal", "https://idp.test"
		switch i {
		case 3:
			route = "token_endpoint"
			if a["token_exchange.client_id"] != "billing-svc" || a["token_exchange.audience"] != "https://billing.internal" {
				t.Errorf("endpoint span attributes %v", a)
			}
		case 4:
			route, issuer, subHash = "token_endpoint", "", ""
		}
		if a["token_exchange.sub_sha256"] != subHash || a["token_exchange.subject_issuer"] != issuer ||
			a["token_exchange.route"] != route {
			t.Errorf("span %d attributes %v", i, a)
		}
		// a child of Caddy's server span of the same request
		parent := otlp.spanByID(s.ParentSpanId)
		if parent == nil {
			parent = otlp.waitParent(t, s.ParentSpanId)
		}
		if !bytes.Equal(parent.TraceId, s.TraceId) || parent.Kind != tracev1.Span_SPAN_KIND_SERVER {
			t.Errorf("parent %q kind %v", parent.Name, parent.Kind)
		}
	}
	if strings.Join(outcomes, ",") != "ok,ok,insufficient_scope,ok,invalid_client" || strings.Join(caches[:3], ",") != "miss,hit," {
		t.Fatalf("outcomes %v, caches %v", outcomes, caches)
	}
	// the steps of each exchange: verify, policy, mint
	wantSteps := []string{"ok,ok,ok", "cached,cached,cached", "ok,denied,not_reached", "ok,ok,ok", "not_reached,not_reached,not_reached"}
	for i, s := range spans {
		a := spanAttrs(s)
		if got := a["token_exchange.verify"] + "," + a["token_exchange.policy"] + "," + a["token_exchange.mint"]; got != wantSteps[i] {
			t.Errorf("span %d (%s): steps %s, want %s", i, a["token_exchange.outcome"], got, wantSteps[i])
		}
	}
	if a := spanAttrs(spans[2]); a["token_exchange.reason"] == "" || a["http.response.status_code"] != "403" {
		t.Fatalf("refusal span %v", a)
	}
	// the upstream's traceparent names the trace of the first request's spans
	if traceID := hex.EncodeToString(spans[1].TraceId); !strings.Contains(tp, traceID) {
		t.Fatalf("traceparent %s is not of trace %s", tp, traceID)
	}
	otlp.mu.Lock()
	raw := otlp.raw.String()
	otlp.mu.Unlock()
	for _, secret := range []string{good, noScope, billing, good[:strings.LastIndex(good, ".")], "alice-7f3", "s3cret-billing"} {
		if strings.Contains(raw, secret) {
			t.Fatal("a token or a raw sub was exported in a span")
		}
	}
}

// waitParent waits for a parent span (exported when its request ends).
func (o *otlpReceiver) waitParent(t *testing.T, id []byte) *tracev1.Span {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if s := o.spanByID(id); s != nil {
			return s
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("the parent span %x never arrived", id)
	return nil
}
