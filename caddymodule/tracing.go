package caddymodule

import (
	"context"
	"net/http"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

const tracerName = "github.com/caddy-token-exchange/caddy-token-exchange/caddymodule"

// exchangeSpan is the OpenTelemetry span of one middleware exchange. It is
// started only when the request is traced (Caddy's `tracing` directive put a
// recording span in its context) and comes from that span's own tracer
// provider: Caddy's tracing module keeps its provider to itself rather than
// setting the global one. Untraced requests get the zero exchangeSpan, whose
// methods do nothing. Attributes never carry a token or a raw `sub`: the
// subject is its SHA-256.
type exchangeSpan struct{ span trace.Span }

func startExchangeSpan(ctx context.Context, route string) exchangeSpan {
	parent := trace.SpanFromContext(ctx)
	if !parent.IsRecording() {
		return exchangeSpan{}
	}
	_, span := parent.TracerProvider().Tracer(tracerName).Start(ctx, "token_exchange",
		trace.WithSpanKind(trace.SpanKindInternal),
		trace.WithAttributes(attribute.String("token_exchange.route", route)))
	return exchangeSpan{span}
}

// exchanged ends the span of an exchange that succeeded.
func (s exchangeSpan) exchanged(m *exchange.Minted, cacheOn bool) {
	if s.span == nil {
		return
	}
	cache := "off"
	if cacheOn {
		cache = "miss"
		if m.Cached {
			cache = "hit"
		}
	}
	s.span.SetAttributes(
		attribute.String("token_exchange.outcome", outcomeOK),
		attribute.String("token_exchange.cache", cache),
		attribute.String("token_exchange.subject_issuer", m.SubjectIssuer),
		attribute.String("token_exchange.sub_sha256", exchange.HashToken(m.Subject)),
		attribute.String("token_exchange.scope", exchange.FormatScope(m.Scopes)),
		attribute.StringSlice("token_exchange.audience", m.Audiences),
		attribute.String("token_exchange.jti", m.JTI),
	)
	s.span.End()
}

// refused ends the span of a refusal: its outcome, reason and status; an
// error status only when the gateway failed (5xx), not the token.
func (s exchangeSpan) refused(e *exchange.Error) {
	if s.span == nil {
		return
	}
	status, _ := exchange.BearerStatus(e)
	attrs := []attribute.KeyValue{
		attribute.String("token_exchange.outcome", refusalOutcome(e)),
		attribute.String("token_exchange.reason", e.Reason),
		attribute.Int("http.response.status_code", status),
	}
	if e.SubjectSub != "" {
		attrs = append(attrs,
			attribute.String("token_exchange.subject_issuer", e.SubjectIssuer),
			attribute.String("token_exchange.sub_sha256", exchange.HashToken(e.SubjectSub)))
	}
	s.span.SetAttributes(attrs...)
	if status >= http.StatusInternalServerError {
		s.span.SetStatus(codes.Error, e.Reason)
	}
	s.span.End()
}
