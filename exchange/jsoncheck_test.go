package exchange

import "testing"

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
