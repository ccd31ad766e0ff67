package caddymodule

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"golang.org/x/crypto/bcrypt"

	// Caddyfile.example configures the demo upstream.
	_ "github.com/caddy-token-exchange/caddy-token-exchange/examples/upstream"
)

// docBlock is one ```caddyfile block of a document, with the line it starts on.
type docBlock struct {
	file string
	line int
	text string
}

// caddyfileBlocks returns every ```caddyfile block of a Markdown file.
func caddyfileBlocks(t *testing.T, path string) []docBlock {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var blocks []docBlock
	var cur *docBlock
	for i, line := range strings.Split(string(data), "\n") {
		switch {
		case cur == nil && strings.HasPrefix(line, "```caddyfile"):
			cur = &docBlock{file: filepath.Base(path), line: i + 2}
		case cur != nil && strings.HasPrefix(line, "```"):
			blocks = append(blocks, *cur)
			cur = nil
		case cur != nil:
			cur.text += line + "\n"
		}
	}
	if cur != nil {
		t.Fatalf("%s: unterminated caddyfile block at line %d", path, cur.line)
	}
	return blocks
}

// docGlobal is the global option a fragment of the README is placed in.
const docGlobal = `{
	token_exchange {
		issuer https://gateway.example.internal
		trust https://idp.example.com {
			jwks_url https://idp.example.com/.well-known/jwks.json
			audience https://gateway.example.internal
			algorithms RS256
		}
	}
}
`

// completeDocBlock makes a README fragment a whole Caddyfile, the way a
// reader would paste it: a trust block into the global option, a route,
// handle or log into a site, a site after the global option.
func completeDocBlock(text string) string {
	first := strings.Fields(text)[0]
	switch first {
	case "{":
		return text
	case "trust":
		return "{\n\ttoken_exchange {\n\t\tissuer https://gateway.example.internal\n" + text + "\t}\n}\n"
	case "route", "handle", "log", "tls":
		return docGlobal + "api.example.com {\n" + text + "}\n"
	default:
		return docGlobal + text
	}
}

// checkAdaptedDoc refuses what adapts but is not meant literally: syntax
// placeholders taken as values, and secret hashes that are not bcrypt.
func checkAdaptedDoc(adapted map[string]any) error {
	var walk func(path string, v any) error
	walk = func(path string, v any) error {
		switch v := v.(type) {
		case map[string]any:
			for k, e := range v {
				if err := walk(path+"."+k, e); err != nil {
					return err
				}
			}
		case []any:
			for i, e := range v {
				if err := walk(fmt.Sprintf("%s[%d]", path, i), e); err != nil {
					return err
				}
			}
		case string:
			if strings.HasPrefix(v, "[<") || strings.HasSuffix(v, "...") || strings.HasSuffix(v, "...]") {
				return fmt.Errorf("%s = %q is a syntax placeholder, not a value", path, v)
			}
			if strings.HasSuffix(path, ".secret_hash") {
				if _, err := bcrypt.Cost([]byte(v)); err != nil {
					return fmt.Errorf("%s = %q is not a bcrypt hash: %v", path, v, err)
				}
			}
		}
		return nil
	}
	return walk("", adapted)
}

// TestDocsCaddyfileBlocksAdapt: every Caddyfile block of README.md and
// xcaddy.md adapts with Caddy's caddyfile adapter (a fragment completed as a
// reader would paste it), and no placeholder is taken for a value.
func TestDocsCaddyfileBlocksAdapt(t *testing.T) {
	var blocks []docBlock
	for _, doc := range []string{"../README.md", "../xcaddy.md"} {
		blocks = append(blocks, caddyfileBlocks(t, doc)...)
	}
	if len(blocks) < 15 {
		t.Fatalf("found only %d caddyfile blocks in the docs", len(blocks))
	}
	for _, b := range blocks {
		t.Run(fmt.Sprintf("%s:%d", b.file, b.line), func(t *testing.T) {
			cfg, err := adapt(t, completeDocBlock(b.text))
			if err != nil {
				t.Fatalf("%s line %d does not adapt: %v\n%s", b.file, b.line, err, b.text)
			}
			if err := checkAdaptedDoc(cfg); err != nil {
				t.Fatalf("%s line %d: %v", b.file, b.line, err)
			}
		})
	}
}

// TestCaddyfileExample: the quickstart config adapts, has a 404 fallback,
// and `caddy fmt` leaves it unchanged.
func TestCaddyfileExample(t *testing.T) {
	data, err := os.ReadFile("../Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := adapt(t, string(data))
	if err != nil {
		t.Fatalf("Caddyfile.example does not adapt: %v", err)
	}
	if err := checkAdaptedDoc(cfg); err != nil {
		t.Fatal(err)
	}
	if formatted := caddyfile.Format(data); !bytes.Equal(formatted, data) {
		t.Fatalf("caddy fmt changes Caddyfile.example; formatted:\n%s", formatted)
	}
	s, _ := json.Marshal(cfg)
	if !strings.Contains(string(s), `"status_code":404`) {
		t.Fatalf("Caddyfile.example has no 404 fallback for unmatched paths: %s", s)
	}
}

// TestDocsEveryOptionDocumented: every Caddyfile option the adapter reads
// (each `case "name":` of caddyfile.go, policy.go and dpop.go) appears in
// a README Caddyfile block.
func TestDocsEveryOptionDocumented(t *testing.T) {
	var docs strings.Builder
	for _, b := range caddyfileBlocks(t, "../README.md") {
		docs.WriteString(b.text)
	}
	words := make(map[string]bool)
	for _, line := range strings.Split(docs.String(), "\n") {
		for _, w := range strings.Fields(line) {
			words[w] = true
		}
	}
	var n int
	for _, src := range []string{"caddyfile.go", "policy.go"} {
		data, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(data), "\n") {
			line = strings.TrimSpace(line)
			if !strings.HasPrefix(line, "case \"") {
				continue
			}
			for _, name := range strings.Split(strings.TrimSuffix(strings.TrimPrefix(line, "case "), ":"), ",") {
				name = strings.Trim(strings.TrimSpace(name), `"`)
				if name == "" || name == "off" || name == "on" {
					continue
				}
				n++
				if !words[name] {
					t.Errorf("option %q (%s) is not in any README Caddyfile block", name, src)
				}
			}
		}
	}
	if n < 50 {
		t.Fatalf("found only %d options in the adapter sources", n)
	}
}

// TestDocsGettingStarted: the README names the Go version go.mod needs and
// warns about the first compile; xcaddy.md passes caddy's flags after `--`
// and pins no tag that does not exist.
func TestDocsGettingStarted(t *testing.T) {
	gomod, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	var goVersion string
	for _, line := range strings.Split(string(gomod), "\n") {
		if v, ok := strings.CutPrefix(line, "go "); ok {
			goVersion = strings.TrimSpace(v)
		}
	}
	readme, _ := os.ReadFile("../README.md")
	xcaddy, _ := os.ReadFile("../xcaddy.md")
	for name, doc := range map[string]string{"README.md": string(readme), "xcaddy.md": string(xcaddy)} {
		if goVersion == "" || !strings.Contains(doc, "`go "+goVersion+"`") {
			t.Errorf("%s does not state go.mod's Go version %q", name, goVersion)
		}
		if !strings.Contains(doc, "2 minutes") {
			t.Errorf("%s does not warn that the first build takes about 2 minutes", name)
		}
	}
	if strings.Contains(string(xcaddy), "xcaddy run --config") || !strings.Contains(string(xcaddy), "xcaddy -- run --config") {
		t.Error("xcaddy.md must pass caddy's flags after -- (xcaddy run --config fails)")
	}
	if strings.Contains(string(xcaddy), "@v0.1.0") {
		t.Error("xcaddy.md pins a tag that does not exist")
	}
	if !strings.Contains(string(xcaddy), "examples/upstream") {
		t.Error("xcaddy.md does not say how to get demo_upstream into an xcaddy build")
	}
}
