package exchange

import (
	"fmt"
	"strings"
	"testing"
)

func TestCheckStrictJSON(t *testing.T) {
	ok := []string{
		`{"a":1,"b":{"a":2},"c":[{"a":1},{"a":2}],"d":"a"}`,
		`{"act":{"sub":"x","act":{"sub":"y"}},"sub":"x"}`,
		`{}`,
	}
	for _, s := range ok {
		if err := checkStrictJSON([]byte(s)); err != nil {
			t.Errorf("%s: %v", s, err)
		}
	}
	bad := []string{
		`{"sub":"alice","sub":"admin"}`,
		`{"a":{"x":1,"x":2}}`,
		`{"a":[{"x":1,"x":2}]}`,
		"{\"sub\":\"\xff\"}",
		`{"a":1`,
		``,
		`{}{}`,
		`{} 1`,
	}
	for _, s := range bad {
		if err := checkStrictJSON([]byte(s)); err == nil {
			t.Errorf("%q accepted", s)
		}
	}
}

func TestCheckStrictJSONEscapedAndManyKeys(t *testing.T) {
	if err := checkStrictJSON([]byte(`{"sub":"a","s\u0075b":"b"}`)); err == nil {
		t.Error("escaped duplicate accepted")
	}
	if err := checkStrictJSON([]byte(`{"a\"b":1,"a\"c":2,"s":"x\\"}`)); err != nil {
		t.Errorf("escapes in keys and values: %v", err)
	}
	var b strings.Builder
	b.WriteString("{")
	for i := 0; i < 100; i++ {
		fmt.Fprintf(&b, `"k%d":%d,`, i, i)
	}
	b.WriteString(`"k7":1}`)
	if err := checkStrictJSON([]byte(b.String())); err == nil {
		t.Error("duplicate among many keys accepted")
	}
	if err := checkStrictJSON([]byte(`{"a":[1,2,{"b":true,"c":null}],"d":-1.5e3}`)); err != nil {
		t.Errorf("valid: %v", err)
	}
}
