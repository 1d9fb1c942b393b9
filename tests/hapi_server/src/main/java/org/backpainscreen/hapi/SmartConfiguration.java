package org.backpainscreen.hapi;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.IOException;
import java.net.URI;
import java.net.URL;
import java.util.List;
import java.util.Optional;

/**
 * The issuer named by AUTH_ISSUER (the test OAuth server), read from its OpenID configuration when first
 * needed (it may start after HAPI), and the `.well-known/smart-configuration` this server publishes for it.
 */
record SmartConfiguration(String issuerUrl) {
	private static final ObjectMapper JSON = new ObjectMapper();

	static Optional<SmartConfiguration> fromEnvironment() {
		return Optional.ofNullable(System.getenv("AUTH_ISSUER")).filter(s -> !s.isBlank())
				.map(s -> new SmartConfiguration(s.replaceAll("/$", "")));
	}

	JsonNode openid() {
		try {
			return JSON.readTree(URI.create(issuerUrl + "/.well-known/openid-configuration").toURL());
		} catch (IOException e) {
			throw new IllegalStateException("The authorization server " + issuerUrl + " cannot be read", e);
		}
	}

	String issuer() {
		return issuerUrl;
	}

	URL jwksUrl() {
		try {
			return URI.create(issuerUrl + "/jwks").toURL();
		} catch (java.net.MalformedURLException e) {
			throw new IllegalArgumentException(e);
		}
	}

	/** SMART App Launch 2.x discovery: the issuer's endpoints and what this server accepts. */
	ObjectNode smartConfiguration() {
		JsonNode m = openid();
		ObjectNode out = JSON.createObjectNode();
		for (String key : List.of("issuer", "jwks_uri", "token_endpoint", "authorization_endpoint",
				"introspection_endpoint")) {
			if (m.has(key)) {
				out.set(key, m.get(key));
			}
		}
		out.set("grant_types_supported", JSON.valueToTree(List.of("authorization_code", "client_credentials")));
		out.set("token_endpoint_auth_methods_supported", JSON.valueToTree(List.of("private_key_jwt")));
		out.set("token_endpoint_auth_signing_alg_values_supported", JSON.valueToTree(List.of("RS384", "ES384")));
		out.set("scopes_supported", JSON.valueToTree(List.of("openid", "fhirUser", "launch", "system/*.cruds",
				"patient/*.rs")));
		out.set("response_types_supported", JSON.valueToTree(List.of("code")));
		out.set("code_challenge_methods_supported", JSON.valueToTree(List.of("S256")));
		out.set("capabilities", JSON.valueToTree(List.of("launch-ehr", "client-public",
				"client-confidential-asymmetric", "context-ehr-patient", "permission-v1", "permission-v2",
				"sso-openid-connect")));
		return out;
	}
}
