"""An answer as an HL7 FHIR R4 DiagnosticReport, for EHR integration.

The report is ``preliminary``: a model's finding awaits a clinician's reading. It holds no patient reference
(the endpoint never sees who the patient is; the calling system links the report to its order and patient),
the model as a contained Device (named by each Observation: R4 lets a report's performer be people only), and one contained Observation per class probability.
"""

from __future__ import annotations

from datetime import UTC, datetime

SYSTEM = "urn:tumorscope"
LOINC_MR_BRAIN = {"system": "http://loinc.org", "code": "24590-2", "display": "MR Brain"}
RADIOLOGY = {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}


def diagnostic_report(answer: dict) -> dict:
    issued = datetime.now(UTC).isoformat(timespec="seconds")
    device = {
        "resourceType": "Device",
        "id": "model",
        "deviceName": [{"name": answer["model_name"], "type": "model-name"}],
        "version": [{"value": str(answer["model_version"])}],
    }
    observations = [
        {
            "resourceType": "Observation",
            "id": f"p-{index}",
            "status": "preliminary",
            "code": {"coding": [{"system": f"{SYSTEM}:class", "code": name}], "text": f"Probability of {name}"},
            "valueQuantity": {"value": round(probability, 6), "unit": "probability", "system": "http://unitsofmeasure.org", "code": "1"},
            "device": {"reference": "#model"},
        }
        for index, (name, probability) in enumerate(answer["probabilities"].items())
    ]
    review = " Needs clinician review: " + answer["review_reason"] + "." if answer["needs_review"] else ""
    return {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": f"{SYSTEM}:prediction", "value": answer["prediction_id"]}],
        "status": "preliminary",
        "category": [{"coding": [RADIOLOGY]}],
        "code": {"coding": [LOINC_MR_BRAIN], "text": "AI tumour screening of brain MRI"},
        "issued": issued,
        "contained": [device, *observations],
        "result": [{"reference": f"#{o['id']}"} for o in observations],
        "conclusion": (
            f"{answer['label']} (confidence {answer['confidence']:.2f}; P(tumour) {answer['tumour_probability']:.3f}, "
            f"operating threshold {answer['operating_threshold']:.3f}).{review}"
        ),
        "conclusionCode": [{"coding": [{"system": f"{SYSTEM}:class", "code": answer["label"]}]}],
    }
