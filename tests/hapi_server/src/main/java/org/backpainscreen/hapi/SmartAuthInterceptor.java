package org.backpainscreen.hapi;

import ca.uhn.fhir.interceptor.api.Hook;
import ca.uhn.fhir.interceptor.api.Interceptor;
import ca.uhn.fhir.interceptor.api.Pointcut;
import ca.uhn.fhir.rest.api.RestOperationTypeEnum;
import ca.uhn.fhir.rest.api.server.RequestDetails;
import ca.uhn.fhir.rest.server.exceptions.AuthenticationException;
import ca.uhn.fhir.rest.server.exceptions.ForbiddenOperationException;
import ca.uhn.fhir.rest.server.servlet.ServletRequestDetails;
import com.nimbusds.jose.JOSEObjectType;
import com.nimbusds.jose.JWSAlgorithm;
import com.nimbusds.jose.jwk.source.JWKSourceBuilder;
import com.nimbusds.jose.proc.DefaultJOSEObjectTypeVerifier;
import com.nimbusds.jose.proc.JWSVerificationKeySelector;
import com.nimbusds.jose.proc.SecurityContext;
import com.nimbusds.jwt.JWTClaimsSet;
import com.nimbusds.jwt.proc.DefaultJWTClaimsVerifier;
import com.nimbusds.jwt.proc.DefaultJWTProcessor;
import java.net.URI;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Set;
import org.hl7.fhir.r4.model.Bundle;

/**
 * SMART Backend Services in front of HAPI, as an EHR's gateway would be: only JWT access tokens the issuer in
 * AUTH_ISSUER signed, for this server (AUTH_AUDIENCE, default its base URL), unexpired (else 401), whose
 * `system/` (or `user/`, `patient/`: no compartment check) scopes cover every interaction, each entry of a
 * transaction too (else 403). SMART v2 (`Observation.crus`, `*.rs`) and v1 (`.read`, `.write`, `.*`) scopes.
 */
@Interceptor
final class SmartAuthInterceptor {
	private static final Map<String, String> V1 = Map.of("read", "rs", "write", "cud", "*", "cruds");
	private final String audience;
	private final DefaultJWTProcessor<SecurityContext> tokens = new DefaultJWTProcessor<>();

	private SmartAuthInterceptor(SmartConfiguration issuer, String audience) {
		this.audience = audience;
		var keys = JWKSourceBuilder.<SecurityContext>create(issuer.jwksUrl()).rateLimited(false).build();
		var algorithms = Set.of(JWSAlgorithm.RS256, JWSAlgorithm.RS384, JWSAlgorithm.ES256, JWSAlgorithm.ES384,
				JWSAlgorithm.PS256);
		tokens.setJWSKeySelector(new JWSVerificationKeySelector<>(algorithms, keys));
		tokens.setJWSTypeVerifier(new DefaultJOSEObjectTypeVerifier<>(new JOSEObjectType("at+jwt"), JOSEObjectType.JWT, null));
		var claims = new DefaultJWTClaimsVerifier<SecurityContext>(
				new JWTClaimsSet.Builder().issuer(issuer.issuer()).build(), Set.of("exp", "scope"));
		claims.setMaxClockSkew(1); // one machine: an expired token is refused at once (Nimbus allows 60 s)
		tokens.setJWTClaimsSetVerifier(claims);
	}

	static Optional<SmartAuthInterceptor> fromEnvironment() {
		return SmartConfiguration.fromEnvironment()
				.map(issuer -> new SmartAuthInterceptor(issuer, System.getenv("AUTH_AUDIENCE")));
	}

	@Hook(Pointcut.SERVER_INCOMING_REQUEST_PRE_HANDLED)
	public void check(RequestDetails request, RestOperationTypeEnum operation) {
		if (operation == RestOperationTypeEnum.METADATA) {
			return;
		}
		JWTClaimsSet claims = verified(request);
		String scope = String.valueOf(claims.getClaim("scope"));
		for (String[] need : needed(request, operation)) {
			if (!granted(scope, need[0]).contains(need[1]) && !granted(scope, "*").contains(need[1])) {
				throw new ForbiddenOperationException(
						"The access token's scopes do not allow this: " + need[0] + "." + need[1] + " is needed");
			}
		}
	}

	private JWTClaimsSet verified(RequestDetails request) {
		String header = Optional.ofNullable(request.getHeader("Authorization")).orElse("");
		if (!header.regionMatches(true, 0, "Bearer ", 0, 7)) {
			throw refused(request, "An access token is required (Authorization: Bearer)");
		}
		try {
			JWTClaimsSet claims = tokens.process(header.substring(7).trim(), null);
			String expected = audience != null ? audience : request.getFhirServerBase();
			if (claims.getAudience() == null || !claims.getAudience().contains(expected)) {
				throw refused(request, "The access token is not for this server (aud)");
			}
			return claims;
		} catch (java.text.ParseException e) {
			throw refused(request, "The access token was refused: it is not a JWT");
		} catch (com.nimbusds.jose.proc.BadJOSEException | com.nimbusds.jose.JOSEException e) {
			String why = String.valueOf(e.getMessage()).contains("no matching key")
					? "it was not signed by a key of the trusted issuer" : e.getMessage();
			throw refused(request, "The access token was refused: " + why);
		}
	}

	private static AuthenticationException refused(RequestDetails request, String why) {
		if (request instanceof ServletRequestDetails servlet) {
			servlet.getServletResponse().addHeader("WWW-Authenticate", "Bearer realm=\"fhir\", error=\"invalid_token\"");
		}
		return new AuthenticationException(why);
	}

	/** The permission letters (c r u d s) the scopes grant on a resource type. */
	private static String granted(String scope, String type) {
		StringBuilder letters = new StringBuilder();
		for (String item : scope.split(" ")) {
			var m = java.util.regex.Pattern.compile("^(?:system|user|patient)/([A-Za-z]+|\\*)\\.([a-z*]+)(?:\\?.*)?$")
					.matcher(item);
			if (m.matches() && m.group(1).equals(type)) {
				String rights = m.group(2);
				letters.append(V1.getOrDefault(rights, rights.matches("c?r?u?d?s?") ? rights : ""));
			}
		}
		return letters.toString();
	}

	/** [resource type, letter] pairs the request needs; a transaction's are its entries'. */
	private static List<String[]> needed(RequestDetails request, RestOperationTypeEnum operation) {
		String type = request.getResourceName();
		return switch (operation) {
			case TRANSACTION, BATCH -> entries((Bundle) request.getResource());
			case CREATE -> List.<String[]>of(new String[] {type, "c"});
			case UPDATE, PATCH -> List.<String[]>of(new String[] {type, "u"});
			case DELETE -> List.<String[]>of(new String[] {type, "d"});
			case SEARCH_TYPE -> List.<String[]>of(new String[] {type, "s"});
			case SEARCH_SYSTEM, HISTORY_SYSTEM -> List.<String[]>of(new String[] {"*", "s"});
			case GET_PAGE -> List.of(); // a next page: its search was checked
			default -> List.<String[]>of(new String[] {type == null ? "*" : type, "r"});
		};
	}

	private static List<String[]> entries(Bundle bundle) {
		return bundle.getEntry().stream().map(e -> {
			Bundle.BundleEntryRequestComponent r = e.getRequest();
			String path = URI.create(r.getUrl().replace("|", "%7C")).getPath();
			String[] parts = path.replaceFirst("^/+", "").split("/");
			String letter = switch (r.getMethod()) {
				case POST -> parts.length > 1 && parts[1].equals("_search") ? "s" : "c";
				case PUT, PATCH -> "u";
				case DELETE -> "d";
				default -> parts.length > 1 ? "r" : "s";
			};
			return new String[] {parts[0], letter};
		}).toList();
	}
}
