package org.backpainscreen.hapi;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.validation.IValidatorModule;
import ca.uhn.fhir.validation.SingleValidationMessage;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Set;
import java.util.stream.Stream;
import org.hl7.fhir.common.hapi.validation.support.PrePopulatedValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.SnapshotGeneratingValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.springframework.core.io.Resource;
import org.springframework.core.io.support.PathMatchingResourcePatternResolver;

/**
 * The validator of writes: HAPI's R4 core definitions and what the server stores (JPA validation support), with
 * the project's own Questionnaires, CodeSystems, ValueSets and StructureDefinitions known from the start, read
 * from the folder named by the `backpain.definitions` system property (the project's questionnaires/), and the
 * few SDC definitions the Questionnaire uses (resources/sdc/: what a clinic's HAPI has from the SDC IG package).
 */
final class ProjectDefinitions {
	private static final Set<String> KINDS = Set.of("Questionnaire", "CodeSystem", "ValueSet", "StructureDefinition");

	private ProjectDefinitions() {}

	static IValidatorModule validator(FhirContext ctx, IValidationSupport jpaValidation) {
		PrePopulatedValidationSupport own = new PrePopulatedValidationSupport(ctx);
		String folder = System.getProperty("backpain.definitions");
		if (folder != null) {
			definitions(ctx, Path.of(folder)).forEach(own::addResource);
		}
		sdc(ctx).forEach(own::addResource);
		IValidatorModule instance = new FhirInstanceValidator(
				new ValidationSupportChain(own, new SnapshotGeneratingValidationSupport(ctx), jpaValidation));
		return context -> {
			instance.validateResource(context);
			context.getMessages().removeIf(ProjectDefinitions::needsThePackageRegistry);
		};
	}

	/**
	 * HAPI 8.8 checks a StructureDefinition's differential by generating its snapshot, which loads the
	 * hl7.fhir.r4.core package from the FHIR package registry; the test machines reach only Maven Central, so
	 * that one message says nothing about the resource. Every other finding on a StructureDefinition stands.
	 */
	private static boolean needsThePackageRegistry(SingleValidationMessage message) {
		return "ERROR_GENERATING_SNAPSHOT".equals(message.getMessageId())
				&& String.valueOf(message.getMessage()).contains("Unable to resolve package id");
	}

	private static Stream<IBaseResource> definitions(FhirContext ctx, Path folder) {
		try (Stream<Path> files = Files.list(folder)) {
			return files.filter(f -> f.toString().endsWith(".json")).sorted().toList().stream()
					.map(f -> parse(ctx, f))
					.filter(r -> KINDS.contains(ctx.getResourceType(r)));
		} catch (IOException e) {
			throw new UncheckedIOException(e);
		}
	}

	private static List<IBaseResource> sdc(FhirContext ctx) {
		try {
			Resource[] files = new PathMatchingResourcePatternResolver().getResources("classpath:sdc/*.json");
			List<IBaseResource> found = new ArrayList<>();
			for (Resource file : files) {
				found.add(ctx.newJsonParser().parseResource(file.getContentAsString(StandardCharsets.UTF_8)));
			}
			return found;
		} catch (IOException e) {
			throw new UncheckedIOException(e);
		}
	}

	private static IBaseResource parse(FhirContext ctx, Path file) {
		try {
			return ctx.newJsonParser().parseResource(Files.readString(file));
		} catch (IOException e) {
			throw new UncheckedIOException(e);
		}
	}
}
