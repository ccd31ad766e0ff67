package caddymodule

import (
	"errors"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the module's Prometheus collectors, registered in Caddy's
// registry (served at the admin /metrics). Caddy makes a new registry on
// every config load, so Provision registers them each time and tolerates
// "already registered". Labels carry only configured, bounded values: a
// route name, an issuer, an outcome. Never a subject or a token.
var metrics = struct {
	once        sync.Once
	exchanges   *prometheus.CounterVec
	duration    *prometheus.HistogramVec
	cache       *prometheus.CounterVec
	jwksFetches *prometheus.CounterVec
	endpoint    *prometheus.CounterVec
	// introspections counts RFC 7662 calls to an issuer.
	introspections *prometheus.CounterVec
	// keyChanges, keySince and keyStorageErrors follow the signing key set.
	keyChanges       prometheus.Counter
	keySince         prometheus.Gauge
	keyStorageErrors prometheus.Counter
}{}

// Outcomes of an exchange, as counted.
const (
	outcomeOK                = "ok"
	outcomeInvalidToken      = "invalid_token"
	outcomeInsufficientScope = "insufficient_scope"
	outcomeDenied            = "denied"
	outcomeError             = "error"
)

func registerMetrics(registry *prometheus.Registry) error {
	const ns, sub = "caddy", "token_exchange"
	metrics.once.Do(func() {
		metrics.exchanges = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "exchanges_total",
			Help: "In-process token exchanges by route and outcome (ok, invalid_token, insufficient_scope, denied, error).",
		}, []string{"route", "outcome"})
		metrics.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "exchange_duration_seconds",
			Help:    "Time spent exchanging the inbound token, by route.",
			Buckets: []float64{.00001, .000025, .00005, .0001, .00025, .0005, .001, .0025, .005, .01, .05},
		}, []string{"route"})
		metrics.cache = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "cache_requests_total",
			Help: "Minted-token cache lookups by result (hit, miss).",
		}, []string{"result"})
		metrics.jwksFetches = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "jwks_fetches_total",
			Help: "JWKS fetches (background and forced) by trusted issuer or private_key_jwt client_id, and result (ok, error).",
		}, []string{"issuer", "result"})
		metrics.endpoint = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "endpoint_requests_total",
			Help: "RFC 8693 token endpoint requests by outcome (ok or the OAuth error code).",
		}, []string{"outcome"})
		metrics.introspections = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "introspections_total",
			Help: "RFC 7662 introspection requests to a trusted issuer, by issuer and result (active, inactive, error); cache hits are not counted.",
		}, []string{"issuer", "result"})
		metrics.keyChanges = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "signing_key_changes_total",
			Help: "Times this instance started signing with another key (rotations it followed).",
		})
		metrics.keySince = prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "signing_key_since_timestamp_seconds",
			Help: "When the key this instance signs with started signing (Unix time); its age is time() minus this.",
		})
		metrics.keyStorageErrors = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "key_storage_errors_total",
			Help: "Failed reads or writes of the signing key set in storage (each retried with backoff).",
		})
	})
	for _, c := range []prometheus.Collector{metrics.exchanges, metrics.duration, metrics.cache, metrics.jwksFetches, metrics.endpoint, metrics.introspections,
		metrics.keyChanges, metrics.keySince, metrics.keyStorageErrors} {
		if err := registry.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) {
				return err
			}
		}
	}
	return nil
}
