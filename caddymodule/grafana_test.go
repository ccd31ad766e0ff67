package caddymodule

import (
	"encoding/json"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// TestGrafanaDashboardMetricsExist: every metric the dashboard in
// examples/grafana queries is one the gateway exports, checked against a real
// /metrics scrape after traffic through both front doors.
func TestGrafanaDashboardMetricsExist(t *testing.T) {
	raw, err := os.ReadFile("../examples/grafana/token-exchange-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(raw, &dash); err != nil || dash.Title == "" || len(dash.Panels) == 0 {
		t.Fatalf("dashboard JSON: %v", err)
	}

	g := startAttackGateway(t, "")
	tok := g.idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
	for i := 0; i < 2; i++ { // a miss, then a hit
		if resp, _ := g.mw(t, atkReq{headers: atkBearer(tok)}); resp.StatusCode != http.StatusOK {
			t.Fatalf("exchange: %d", resp.StatusCode)
		}
	}
	g.mw(t, atkReq{headers: atkBearer("not.a.token")})
	if r := g.ep(t, exchangeForm(tok), atkClient, atkSecret); r.status != http.StatusOK {
		t.Fatalf("endpoint: %d %s", r.status, r.raw)
	}
	exposition := g.metrics(t)

	name := regexp.MustCompile(`caddy_token_exchange_[a-z_]+`)
	checked := 0
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, target := range p.Targets {
			for _, m := range name.FindAllString(target.Expr, -1) {
				base := m
				for _, suffix := range []string{"_bucket", "_sum", "_count"} {
					if b, ok := strings.CutSuffix(m, suffix); ok && strings.Contains(exposition, "# TYPE "+b+" histogram") {
						base = b
					}
				}
				if !strings.Contains(exposition, "# TYPE "+base+" ") {
					t.Errorf("panel %q queries %s, which the gateway does not export", p.Title, m)
				}
				checked++
			}
		}
	}
	if checked < 8 {
		t.Errorf("only %d metric references checked", checked)
	}
}
