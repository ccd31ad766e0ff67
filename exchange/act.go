package exchange

import "fmt"

// DefaultMaxActDepth bounds how many actors a subject token's act chain may
// already hold before we refuse to extend it.
const DefaultMaxActDepth = 5

// Actor identifies the party that acts on the subject's behalf: the gateway
// itself for in-process exchanges, or a client or actor token on the endpoint.
type Actor struct {
	Subject  string // act.sub
	Issuer   string // act.iss, only when it differs from the minting issuer
	ClientID string // act.client_id, when the actor is identified by client
}

// claims returns the actor's identity claims as they appear in `act`.
func (a Actor) claims() map[string]any {
	m := make(map[string]any, 3)
	if a.Subject != "" {
		m["sub"] = a.Subject
	}
	if a.Issuer != "" {
		m["iss"] = a.Issuer
	}
	if a.ClientID != "" {
		m["client_id"] = a.ClientID
	}
	return m
}

// String names the actor for logs and placeholders.
func (a Actor) String() string {
	if a.Subject != "" {
		return a.Subject
	}
	return a.ClientID
}

// checkActChain validates a subject token's act claim (RFC 8693 §4.1): absent,
// or a JSON object whose nested acts are objects too, no deeper than maxDepth.
// It returns the depth of the chain.
func checkActChain(v any, maxDepth int) (int, error) {
	depth := 0
	for v != nil {
		obj, ok := v.(map[string]any)
		if !ok {
			return depth, fmt.Errorf("act claim is a %T, not a JSON object", v)
		}
		depth++
		if depth > maxDepth {
			return depth, fmt.Errorf("act chain is deeper than %d", maxDepth)
		}
		v = obj["act"]
	}
	return depth, nil
}

// nestAct builds the act claim of a minted token: the new actor outermost,
// with the subject token's prior act chain nested inside, never dropped.
func nestAct(actor Actor, prior map[string]any) map[string]any {
	act := actor.claims()
	if prior != nil {
		act["act"] = prior
	}
	return act
}

// mayActPermits checks the subject token's may_act claim (RFC 8693 §4.4)
// against the actor. Every identity claim may_act names must match the actor;
// `iss` is compared with the actor's issuer (or the gateway's own issuer when
// the actor carries none). A may_act that names nothing is refused. Without
// `iss`, a `sub` is one of the subject token's issuer (sub values are unique
// only per issuer): an actor token from another issuer does not match. The
// gateway's own actor and authenticated clients (actorTokenIssuer "") are
// matched by their configured identifiers.
func mayActPermits(mayAct any, actor Actor, ownIssuer, subjectIssuer, actorTokenIssuer string) error {
	obj, ok := mayAct.(map[string]any)
	if !ok {
		return fmt.Errorf("may_act is a %T, not a JSON object", mayAct)
	}
	if len(obj) == 0 {
		return fmt.Errorf("may_act names no actor")
	}
	actorIss := actor.Issuer
	if actorIss == "" {
		actorIss = ownIssuer
	}
	want := map[string]string{"sub": actor.Subject, "iss": actorIss, "client_id": actor.ClientID}
	named := false
	for k, v := range obj {
		s, isString := v.(string)
		have, known := want[k]
		if !known {
			return fmt.Errorf("may_act names %q, which this actor cannot show", k)
		}
		if !isString || have == "" || s != have {
			return fmt.Errorf("may_act %s does not name this actor", k)
		}
		if k != "iss" {
			named = true
		}
	}
	if !named {
		return fmt.Errorf("may_act names no sub or client_id")
	}
	if _, hasIss := obj["iss"]; !hasIss && actorTokenIssuer != "" && actorTokenIssuer != subjectIssuer {
		return fmt.Errorf("may_act without iss names a subject of the subject token's issuer; the actor token is from another issuer")
	}
	return nil
}
