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
	)
	step := stepOK
	if m.Cached {
		step = stepCached
	}
	s.span.SetAttributes(stepAttrs(step, step, step)...)
	s.span.SetAttributes(
		attribute.String("token_exchange.subject_issuer", m.SubjectIssuer),
		attribute.String("token_exchange.sub_sha256", exchange.HashToken(m.Subject)),
		attribute.String("token_exchange.scope", exchange.FormatScope(m.Scopes)),
		attribute.StringSlice("token_exchange.audience", m.Audiences),
		attribute.String("token_exchange.jti", m.JTI),
	)
	s.span.End()
}

// refused ends the span of a middleware refusal.
func (s exchangeSpan) refused(e *exchange.Error) {
	if s.span == nil {
		return
	}
	status, _ := exchange.BearerStatus(e)
	s.failed(refusalOutcome(e), status, e)
}

// failed ends the span of a refusal: its outcome, reason and status; an
// error status only when the gateway failed (5xx), not the token.
func (s exchangeSpan) failed(outcome string, status int, e *exchange.Error) {
	attrs := []attribute.KeyValue{
		attribute.String("token_exchange.outcome", outcome),
		attribute.String("token_exchange.reason", e.Reason),
		attribute.Int("http.response.status_code", status),
	}
	attrs = append(attrs, stepAttrs(refusalSteps(e))...)
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

// The result of each step of an exchange, as span attributes
// token_exchange.verify, .policy and .mint: one span per exchange, with the
// steps as its attributes rather than child spans.
const (
	stepOK         = "ok"
	stepCached     = "cached" // a cache hit: the earlier exchange's result
	stepFailed     = "failed"
	stepDenied     = "denied"
	stepNotReached = "not_reached"
)

func stepAttrs(verify, policy, mint string) []attribute.KeyValue {
	return []attribute.KeyValue{
		attribute.String("token_exchange.verify", verify),
		attribute.String("token_exchange.policy", policy),
		attribute.String("token_exchange.mint", mint),
	}
}

// refusalSteps tells which step refused. The engine records the subject on
// every error after verification (policy, scope, minting), so an error
// without one failed verification or came before it.
func refusalSteps(e *exchange.Error) (verify, policy, mint string) {
	if e.SubjectSub != "" {
		if e.Kind == exchange.KindServer {
			return stepOK, stepOK, stepFailed
		}
		return stepOK, stepDenied, stepNotReached
	}
	switch e.Kind {
	case exchange.KindMissingToken, exchange.KindInvalidToken, exchange.KindInvalidDPoPProof,
		exchange.KindUseDPoPNonce, exchange.KindServer, exchange.KindUnavailable:
		return stepFailed, stepNotReached, stepNotReached
	}
	// client authentication or the request itself, before the token
	return stepNotReached, stepNotReached, stepNotReached
}

type endpointSpanKey struct{}

// withEndpointSpan starts the span of a token endpoint request, kept in
// the request's context for endEndpointSpan (the endpoint's outcome hook).
func withEndpointSpan(r *http.Request) *http.Request {
	span := startExchangeSpan(r.Context(), "token_endpoint")
	if span.span == nil {
		return r
	}
	return r.WithContext(context.WithValue(r.Context(), endpointSpanKey{}, span))
}

// endEndpointSpan ends it with the endpoint's answer: the client, and the
// minted token's facts or the OAuth error.
func endEndpointSpan(r *http.Request, o *exchange.EndpointOutcome, cacheOn bool) {
	span, ok := r.Context().Value(endpointSpanKey{}).(exchangeSpan)
	if !ok {
		return
	}
	if o.Client != nil {
		span.span.SetAttributes(attribute.String("token_exchange.client_id", o.Client.ClientID))
	}
	if o.Issued != nil {
		span.exchanged(o.Issued.Minted, cacheOn)
		return
	}
	e := o.Err
	if e == nil {
		e = &exchange.Error{}
	}
	span.failed(o.Code, o.Status, e)
}
