package caddymodule

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// A panic inside the exchange must reach the client as a bare 500, be
// logged, and never call the next handler. The handler here has no engine
// and no gate at all, so the admission panics for real (nil dereference).
func TestMiddlewarePanicBecomes500(t *testing.T) {
	if err := registerMetrics(prometheus.NewRegistry()); err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	h := &Handler{Audiences: []string{"https://a"}, logger: zap.New(core), routeLabel: "https://a"}
	h.okCount = metrics.exchanges.WithLabelValues(h.routeLabel, outcomeOK)
	h.hitCount = metrics.cache.WithLabelValues("hit")
	h.missCount = metrics.cache.WithLabelValues("miss")
	h.duration = metrics.duration.WithLabelValues(h.routeLabel)

	req := httptest.NewRequest(http.MethodGet, "/api", nil)
	req.Header.Set("Authorization", "Bearer header.payload.signature-that-is-long-enough")
	repl := caddy.NewReplacer()
	req = req.WithContext(context.WithValue(req.Context(), caddy.ReplacerCtxKey, repl))
	rec := httptest.NewRecorder()
	called := false
	next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { called = true; return nil })

	if err := h.ServeHTTP(rec, req, next); err != nil {
		t.Fatalf("ServeHTTP returned %v", err)
	}
	if rec.Code != http.StatusInternalServerError {
		t.Fatalf("status %d, want 500", rec.Code)
	}
	if called {
		t.Fatal("next handler called after a panic")
	}
	if strings.Contains(rec.Body.String(), "panic") || strings.Contains(rec.Body.String(), "goroutine") {
		t.Fatalf("the panic leaked to the client: %q", rec.Body.String())
	}
	if logs.FilterMessage("panic in token exchange").Len() != 1 {
		t.Fatalf("panic not logged: %v", logs.All())
	}
}
