package org.backpainscreen.hapi;

import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.IOException;

/** GET /fhir/.well-known/smart-configuration, open as SMART asks (404 when no AUTH_ISSUER is set). */
final class SmartDiscoveryServlet extends HttpServlet {
	@Override
	protected void doGet(HttpServletRequest request, HttpServletResponse response) throws IOException {
		var issuer = SmartConfiguration.fromEnvironment();
		if (issuer.isEmpty()) {
			response.sendError(404);
			return;
		}
		response.setContentType("application/json");
		response.getWriter().write(issuer.get().smartConfiguration().toString());
	}
}
